"""Pictures for the analysis commands (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spectrum_plots(report: dict, directory: str | Path) -> list[Path]:
    """Normalised singular-value spectra per module type, and effective rank per module."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[list[float]]] = {}
    for row in report["modules"]:
        by_kind.setdefault(row["path"].rsplit(".", 1)[-1], []).append(row["singular_values"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, spectra in sorted(by_kind.items()):
        values = torch.tensor(spectra, dtype=torch.float64)
        energy = (values ** 2).cumsum(1) / (values ** 2).sum(1, keepdim=True).clamp_min(1e-30)
        ax.plot(range(1, energy.shape[1] + 1), energy.mean(0).numpy(), marker="o", label=kind)
    ax.set(xlabel="k (top singular values)", ylabel="share of update energy ||ΔW||²",
           title=f"cumulative energy of ΔW = s·B·A (r={report['r']})", ylim=(0, 1.02))
    ax.axhline(0.99, color="grey", lw=0.5, ls="--")
    ax.legend()
    spectrum = directory / "energy_by_rank.png"
    fig.tight_layout()
    fig.savefig(spectrum, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, len(report["modules"]) * 0.15), 4))
    names = [row["path"] for row in report["modules"]]
    ax.bar(range(len(names)), [row["effective_rank_90"] for row in report["modules"]], label="90% energy")
    ax.bar(range(len(names)), [row["effective_rank_99"] for row in report["modules"]], alpha=0.4, label="99% energy")
    ax.set(xlabel="adapted module (model order)", ylabel="effective rank", title="effective rank per module")
    ax.legend()
    ranks = directory / "effective_rank.png"
    fig.tight_layout()
    fig.savefig(ranks, dpi=110)
    plt.close(fig)
    return [spectrum, ranks]


def similarity_heatmaps(grids: dict[str, torch.Tensor], directory: str | Path, labels=("A1", "A2")) -> list[Path]:
    """One phi(i, j) heatmap per module type, averaged over the layers, as in the LoRA paper."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[torch.Tensor]] = {}
    for path, grid in grids.items():
        by_kind.setdefault(path.rsplit(".", 1)[-1], []).append(grid)
    written = []
    for kind, kind_grids in sorted(by_kind.items()):
        mean = torch.stack(kind_grids).mean(0).numpy()
        fig, ax = plt.subplots(figsize=(6, 4))
        image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower",
                          extent=(0.5, mean.shape[1] + 0.5, 0.5, mean.shape[0] + 0.5))
        fig.colorbar(image, ax=ax, label="phi")
        ax.set(xlabel=f"j (top directions of {labels[1]})", ylabel=f"i (top directions of {labels[0]})",
               title=f"subspace similarity, {kind} (mean over {len(kind_grids)} layers)")
        path = directory / f"similarity_{kind}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def loss_curve(log_path: str | Path, png_path: str | Path, metric: str = "loss") -> Path:
    """Training ``metric`` per step (the loss; GRPO runs plot their mean reward) and validation
    metrics, when the log has them, from a JSONL log."""
    import json

    plt = _pyplot()
    train, evals = [], []
    for line in Path(log_path).read_text().splitlines():
        entry = json.loads(line)
        if metric in entry and "eval" not in entry:
            train.append((entry["step"], entry[metric]))
        elif "eval" in entry:
            evals.append((entry["step"], entry["eval"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, lw=0.8, alpha=0.5, label=f"train {metric}")
        window = max(1, len(values) // 30)
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, lw=1.6, label=f"train {metric} (mean of {window})")
    ax.set(xlabel="step", ylabel=metric, title="training")
    if evals:
        key = next(k for k in ("reward", "accuracy", "loss") if k in evals[0][1])
        other = ax.twinx() if key != metric else ax
        other.plot([s for s, _ in evals], [m[key] for _, m in evals], "o-", color="C3", label=f"validation {key}")
        if other is not ax:
            other.set_ylabel(f"validation {key}")
            other.legend(loc="upper right")
    ax.legend(loc="upper left" if evals else "best")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def extraction_plot(report: dict, directory: str | Path) -> Path:
    """Per extracted module: the share of ‖ΔW‖² the adapter keeps, and the rank it took."""
    plt = _pyplot()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = report["modules"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, len(rows) * 0.12), 6), sharex=True)
    positions = range(len(rows))
    top.bar(positions, [row["retained_energy"] for row in rows], color="tab:blue")
    top.set(ylabel="retained share of ‖ΔW‖²", ylim=(0, 1.02),
            title=f"extraction: {'rank ' + str(report['rank']) if report['rank'] else 'energy ' + str(report['energy'])}")
    bottom.bar(positions, [row["rank"] for row in rows], color="tab:orange")
    bottom.set(xlabel="linear layer (model order)", ylabel="rank")
    path = directory / "extraction.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
