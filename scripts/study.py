"""The seed study's analysis (docs/results.md): three markdown tables on stdout and a figure.

    python scripts/study.py results/study/*_seed* --out docs/figures/study.png

A run is a folder named <method>_seed<k> (the study's naming, scripts/study.sh) holding the
metrics.jsonl a training script writes and, where the study command wrote it, wall_seconds (a line
per finished launch). The tables: per method, mean +- SE over seeds; val accuracy after, row minus
column, paired by seed; val accuracy per run. Methods come in the order of the folders given.
Needs numpy and matplotlib only, no module of the repository.
"""

import argparse
import json
import math
import os
import re

import numpy as np

# a step's logged seconds, validation aside
TIMES = ("time_gen", "time_reward", "time_train", "time_sync")
SMOOTH = 5  # steps in the centred moving average of the training curves


def method_name(run):
    """results/study/grpo_seed1 -> grpo."""
    return re.sub(r"_seed\d+$", "", os.path.basename(os.path.normpath(run)))


def read_rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def mean_se(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarize(runs):
    """{method: [a dict per run]}: val accuracy before and after, gain, the entropy of the last 10
    steps (those that trained on a token: a step without a DPO pair logs 0), final val length and
    SE, minutes logged (steps and validations), wall clock in minutes (the sum of wall_seconds, nan
    without it), every val accuracy, the seed ("_seed0")."""
    methods = {}
    for run in runs:
        rows, name = read_rows(run), method_name(run)
        val, last = [r for r in rows if "val_reward" in r], max(r["step"] for r in rows)
        trained = [r for r in rows if r["step"] >= last - 10 and r.get("entropy", 0) > 0]
        wall = os.path.join(run, "wall_seconds")
        methods.setdefault(name, []).append(
            {
                "before": val[0]["val_reward"],
                "after": val[-1]["val_reward"],
                "gain": val[-1]["val_reward"] - val[0]["val_reward"],
                "entropy": np.mean([r["entropy"] for r in trained] or [np.nan]),
                "length": val[-1]["val_length"],
                "se": val[-1]["val_reward_se"],
                "minutes": sum(r.get(k, 0.0) for r in rows for k in TIMES + ("time_val",)) / 60,
                "seed": os.path.basename(os.path.normpath(run))[len(name) :],
                "wall": sum(map(float, open(wall))) / 60 if os.path.exists(wall) else np.nan,
                "vals": [r["val_reward"] for r in val],
            }
        )
    return methods


def tables(methods):
    """Markdown: the summary per method, the paired differences (* beyond 2 SE), the runs."""
    keys = ["before", "after", "gain", "entropy", "length"]
    head = ["method", "runs", "val before", "val after", "gain", "entropy, last 10 steps"]
    head += ["val length after", "one run's SE", "minutes per run, logged (median)"]
    lines = ["| " + " | ".join(head) + " | wall clock (median) |", "|" + " --- |" * 10]
    for name, rs in methods.items():
        cells = ["%.3f +- %.3f" % mean_se([r[k] for r in rs]) for k in keys]
        cells.append(f"{np.mean([r['se'] for r in rs]):.3f}")
        cells += [f"{np.median([r[k] for r in rs]):.1f}" for k in ("minutes", "wall")]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    after = {name: {r["seed"]: r["after"] for r in rs} for name, rs in methods.items()}
    lines += ["", "| val after: row - column | " + " | ".join(methods) + " |"]
    lines.append("|" + " --- |" * (len(methods) + 1))
    for a in methods:
        cells = []
        for b in methods:
            d = [after[a][k] - after[b][k] for k in after[a] if k in after[b]] if a != b else []
            m, se = mean_se(d) if d else (0, 0)
            cells.append("%+.3f +- %.3f%s" % (m, se, "*" if abs(m) > 2 * se else "") if d else "")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    # per run: its val accuracies in step order (before / step 15 / step 30) and its wall clock
    seeds = sorted({r["seed"] for rs in methods.values() for r in rs}, key=lambda s: int(s[5:]))
    lines += ["", "| method | " + " | ".join(f"seed {s[5:]}" for s in seeds) + " |"]
    lines.append("|" + " --- |" * (len(seeds) + 1))
    for name, rs in methods.items():
        by_seed = {r["seed"]: r for r in rs}
        cells = []
        for s in seeds:
            r = by_seed.get(s)
            wall = "" if r is None or np.isnan(r["wall"]) else f" ({r['wall']:.1f} min)"
            cells.append("" if r is None else " / ".join(f"{v:.3f}" for v in r["vals"]) + wall)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(rows, key):
    """A run's per-step values of key, as a centred moving average over SMOOTH steps. nan where the
    value is not logged (offline DPO's reward, sampled once, stays one point) and, for entropy,
    logp_gap and kl, on a step that trained on no token (it logs 0)."""
    steps = max(r["step"] for r in rows if "entropy" in r or "reward" in r) + 1
    y = np.full(steps, np.nan)
    for r in rows:
        if r["step"] < steps and r.get(key) is not None:
            untrained = key in ("entropy", "logp_gap", "kl") and r.get("entropy") == 0
            y[r["step"]] = np.nan if untrained else r[key]
    h, ok = SMOOTH // 2, np.isfinite(y)
    smooth = [np.nanmean(y[max(0, i - h) : i + h + 1]) if ok[i] else np.nan for i in range(steps)]
    return np.array(smooth)


def band(arrays):
    """Mean and SE over seeds, step by step, of arrays padded with nan to one length."""
    n = max(len(a) for a in arrays)
    a = np.array([np.pad(x, (0, n - len(x)), constant_values=np.nan) for x in arrays])
    count = np.isfinite(a).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(a, 0) / count
        se = np.sqrt(np.nansum((a - mean) ** 2, 0) / (count - 1) / count)
    return mean, np.where(count > 1, se, 0.0)


def val_points(runs_rows):
    """Per validation step (of any seed): mean and SE over seeds of val accuracy and of the
    training minutes logged before it (TIMES of the steps before); SE 0 for a single seed."""
    acc, clock = {}, {}
    for rows in runs_rows:
        t = 0.0
        for r in rows:
            if "val_reward" in r:
                acc.setdefault(r["step"], []).append(r["val_reward"])
                clock.setdefault(r["step"], []).append(t / 60)
            t += sum(r.get(k, 0.0) for k in TIMES)
    steps = sorted(acc)
    acc_mean, acc_se = zip(*(mean_se(acc[s]) for s in steps))
    t_mean, t_se = zip(*(mean_se(clock[s]) for s in steps))
    return steps, *(np.nan_to_num(np.array(x)) for x in (acc_mean, acc_se, t_mean, t_se))


def plot(runs, path):
    """A colour per method: its mean over seeds with +- 1 SE (band or bars). Val accuracy against
    step and logged training minutes; reward, entropy, length, logp_gap, kl (smoothed) by step."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    by_method = {}
    for run in runs:
        by_method.setdefault(method_name(run), []).append(read_rows(run))
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.4))
    (ax_vs, ax_vt, ax_r), (ax_e, ax_l, ax_k) = axes
    n = len(by_method)
    final = {}
    for k, (name, runs_rows) in enumerate(by_method.items()):
        c = f"C{k}"
        steps, acc, acc_se, minutes, minutes_se = val_points(runs_rows)
        final[name] = acc[-1]
        dodge = (k - (n - 1) / 2) * 0.45  # side by side, so the error bars do not cover each other
        kw = dict(color=c, marker="o", markersize=4, capsize=2.5, linewidth=1.6)
        ax_vs.errorbar(np.array(steps) + dodge, acc, yerr=acc_se, **kw)
        ax_vt.errorbar(minutes, acc, yerr=acc_se, xerr=minutes_se, **kw)
        for ax, key, style in [
            (ax_r, "reward", "-"),
            (ax_e, "entropy", "-"),
            (ax_l, "length", "-"),
            (ax_k, "logp_gap", "-"),
            (ax_k, "kl", "--"),
        ]:
            mean, se = band([curves(rows, key) for rows in runs_rows])
            x = np.arange(len(mean))
            if np.isfinite(mean).sum() == 1:  # offline DPO samples once, before step 0
                i = int(np.flatnonzero(np.isfinite(mean))[0])
                ax.errorbar(
                    x[i], mean[i], yerr=se[i], color=c, marker="s", markersize=5, capsize=2.5
                )
                ax.annotate(
                    f"{name}: sampled once",
                    (x[i], mean[i]),
                    xytext=(6, -10),
                    textcoords="offset points",
                    color=c,
                    fontsize=7,
                )
                continue
            ax.plot(x, mean, style, color=c, linewidth=1.4)
            ax.fill_between(x, mean - se, mean + se, color=c, alpha=0.15, linewidth=0)
    smooth = f"{SMOOTH}-step mean"
    ax_vs.set(title="validation accuracy", xlabel="step", ylabel="accuracy")
    ax_vt.set(
        title="validation accuracy against time",
        ylabel="accuracy",
        xlabel="training minutes logged (gen + reward + train + sync)",
    )
    ax_r.set(title="training reward", xlabel="step", ylabel=f"reward ({smooth})")
    ax_e.set(title="next-token entropy", xlabel="step", ylabel=f"entropy ({smooth})")
    ax_l.set(title="response length", xlabel="step", ylabel=f"tokens ({smooth})")
    ax_k.set(
        title="logp_gap (solid), kl (dashed)", xlabel="step", ylabel=f"nats per token ({smooth})"
    )
    ax_k.axhline(0, color="0.6", linewidth=0.6)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    order = sorted(final, key=lambda m: -final[m])  # the legend: from the best final accuracy down
    handles = [
        plt.Line2D([], [], color=f"C{list(by_method).index(m)}", marker="o", linewidth=2)
        for m in order
    ]
    labels = [f"{m}: val after {final[m]:.3f}" for m in order]
    fig.legend(handles, labels, loc="lower center", ncol=len(order), fontsize=8.5, frameon=False)
    n_seeds = "/".join(map(str, sorted({len(r) for r in by_method.values()})))
    fig.suptitle(
        f"Mean over {n_seeds} seeds per method; bands and bars: +- 1 SE over seeds", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run folders named <method>_seed<k>")
    p.add_argument("--out", required=True, help="the figure, e.g. docs/figures/study.png")
    args = p.parse_args()
    missing = [run for run in args.runs if not os.path.exists(os.path.join(run, "metrics.jsonl"))]
    if missing:
        raise SystemExit(f"study.py: no metrics.jsonl in {missing[0]}")
    plot(args.runs, args.out)
    print(tables(summarize(args.runs)))


if __name__ == "__main__":
    main()
