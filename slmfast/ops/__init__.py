"""One module per op: its contract, plain-PyTorch reference, autograd wiring and dispatch."""
