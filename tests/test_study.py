"""scripts/study.py, the seed study's analysis: its three tables, hand-computed, and its figure."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_study_summarizes_seeds(tmp_path):
    """Two seeds of one method and two of another: the figure, the study table's mean +- SE over
    seeds, gain, entropy of the last 10 steps (a step without pairs logs 0: left out) and median
    minutes, the paired differences, and the per-run table."""

    def run(name, before, after, entropies):
        os.makedirs(tmp_path / name)
        rows = [{"step": 0, "val_reward": before, "val_reward_se": 0.02, "val_length": 9.0}]
        rows[0] |= {"time_val": 30.0, "entropy": entropies[0], "time_gen": 6.0, "time_train": 24.0}
        rows += [
            {"step": s, "entropy": e, "time_gen": 6.0, "time_train": 24.0}
            for s, e in enumerate(entropies[1:], 1)
        ]
        rows += [
            {"step": len(entropies), "val_reward": after, "val_reward_se": 0.03}
            | {"val_length": 7.0, "time_val": 30.0}
        ]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    runs = [
        run("a_seed0", 0.3, 0.5, [0.9] * 8 + [0.2, 0.0] + [0.3] * 8),
        run("a_seed1", 0.4, 0.5, [0.5] * 20),
        run("b_seed0", 0.3, 0.35, [0.1] * 20),
        run("b_seed1", 0.4, 0.3, [0.1] * 20),
    ]
    (tmp_path / "a_seed0" / "wall_seconds").write_text("600\n120\n")  # two launches: 12 min
    (tmp_path / "a_seed1" / "wall_seconds").write_text("840\n")
    figure = tmp_path / "figures" / "study.png"
    os.makedirs(figure.parent)
    script = os.path.join(ROOT, "scripts", "study.py")
    p = subprocess.run(
        [sys.executable, script, *runs, "--out", str(figure)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no module of the repository on the path
    )
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(figure) > 10000
    tables = p.stdout.strip("\n").split("\n\n")
    assert len(tables) == 3, p.stdout
    table, diff, per_run = (
        {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in t.splitlines()}
        for t in tables
    )
    a, b = table["a"], table["b"]
    # a: before 0.3, 0.4 -> 0.35 +- 0.05; after 0.5, 0.5; gain 0.2, 0.1 -> 0.15 +- 0.05; entropy of
    # steps 8-17 of seed 0: (0.2 + 8 x 0.3) / 9 = 0.2889 (step 9's 0 left out), of steps 10-19 of
    # seed 1: 0.5 -> 0.394 +- 0.106
    assert a[:5] == ["2", "0.350 +- 0.050", "0.500 +- 0.000", "0.150 +- 0.050", "0.394 +- 0.106"], a
    # val length 7, one run's SE 0.03; minutes: 18 steps x 30 s + 2 x 30 s = 10 min, 20 steps:
    # 11 min -> 10.5; wall clock: 12 and 14 min -> 13; b has no wall_seconds
    assert a[5:] == ["7.000 +- 0.000", "0.030", "10.5", "13.0 |"], a
    assert b[:4] == ["2", "0.350 +- 0.050", "0.325 +- 0.025", "-0.025 +- 0.075"], b
    assert b[-2:] == ["11.0", "nan |"], b
    # after, a - b paired by seed: 0.5 - 0.35 = 0.15 and 0.5 - 0.3 = 0.2 -> 0.175 +- 0.025, over
    # 2 SE: starred
    assert diff["a"] == ["", "+0.175 +- 0.025* |"], diff
    assert diff["b"] == ["-0.175 +- 0.025*", " |"], diff
    # per run: val accuracy before / after, and the wall clock where wall_seconds exists
    assert per_run["method"] == ["seed 0", "seed 1 |"], per_run
    assert per_run["a"] == ["0.300 / 0.500 (12.0 min)", "0.400 / 0.500 (14.0 min) |"], per_run
    assert per_run["b"] == ["0.300 / 0.350", "0.400 / 0.300 |"], per_run
