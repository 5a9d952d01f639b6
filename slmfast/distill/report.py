"""Comparing runs: token efficiency, the validation-curve plot, and the README-style summary.

Token efficiency (the demo's headline figure): the number of training tokens the distilled
student needs to reach the plain student's final validation loss, as a fraction of the plain
student's tokens. It is read off the evaluation curve, interpolating linearly in tokens between
the two evaluations that bracket the target loss (the resolution is the evaluation interval);
None when the distilled student never reaches it.
"""

from __future__ import annotations

from pathlib import Path


def token_efficiency(distilled: list[dict], plain: list[dict]) -> dict:
    """{'target_loss', 'tokens', 'plain_tokens', 'fraction'} (tokens/fraction None if not reached)."""
    target = plain[-1]["val_loss"]
    plain_tokens = plain[-1]["tokens"]
    curve = sorted(((e["tokens"], e["val_loss"]) for e in distilled), key=lambda x: x[0])
    reached = None
    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                reached = float(tokens)
            else:
                t0, l0 = curve[i - 1]
                reached = t0 + (l0 - target) / (l0 - loss) * (tokens - t0) if l0 != loss else float(tokens)
            break
    return {"target_loss": target, "tokens": reached, "plain_tokens": plain_tokens,
            "fraction": reached / plain_tokens if reached is not None and plain_tokens else None}


def plot_curves(path: str | Path, curves: dict[str, list[dict]], teacher_loss: float | None, title: str,
                efficiency: dict | None = None) -> Path:
    """Validation loss against training tokens, one line per run, the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for label, evals in curves.items():
        xs = [e["tokens"] / 1e6 for e in evals]
        ax.plot(xs, [e["val_loss"] for e in evals], marker="o", markersize=3, label=label)
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color="gray", linestyle="--", linewidth=1,
                   label=f"teacher ({teacher_loss:.3f})")
    if efficiency and efficiency.get("tokens") is not None:
        ax.axhline(efficiency["target_loss"], color="black", linestyle=":", linewidth=0.8)
        label = f"distilled reaches plain's final loss at {100 * efficiency['fraction']:.0f}% of the tokens"
        ax.plot([efficiency["tokens"] / 1e6], [efficiency["target_loss"]], marker="*", markersize=12,
                color="black", label=label)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    finals = [e[-1]["val_loss"] for e in curves.values() if e]
    if finals and teacher_loss is not None:
        low = min(finals + [teacher_loss])
        ax.set_ylim(low - 0.3, max(e[min(1, len(e) - 1)]["val_loss"] for e in curves.values() if e) + 0.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
