"""eval.py's tables on hand-written results.json folders: a diverged seed (NaN) is named and shows n/a."""
import csv
import io
import json

import eval as ev


def write(folder, **result):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(result))


def test_a_nan_seed_is_named_and_shows_n_a_not_nan_or_h_zero(tmp_path, capsys):
    base = dict(setting="base2new", method="coop", dataset="dtd", shots=16, split_sha256="x")
    write(tmp_path / "seed1", **base, seed=1, base_acc=80.0, new_acc=60.0)
    write(tmp_path / "seed2", **base, seed=2, base_acc=float("nan"), new_acc=float("nan"))
    ev.tables([str(tmp_path)])
    out, err = capsys.readouterr()
    assert "seed2" in err and "NaN" in err  # the run is named
    row = next(line for line in out.splitlines() if "| dtd |" in line)
    assert row.split("|")[3:6] == [" n/a ", " n/a ", " n/a "], row  # not "nan" and H not 0.00
    assert "nan" not in out and "0.00" not in out


def two_seeds(tmp_path, method="coop", dataset="dtd", seeds=((80.0, 60.0), (70.0, 40.0)), **extra):
    base = dict(setting="base2new", method=method, dataset=dataset, shots=16, split_sha256="ab" * 32, **extra)
    for i, (b, n) in enumerate(seeds, 1):
        write(tmp_path / f"{method}_{dataset}_seed{i}", **base, seed=i, base_acc=b, new_acc=n)


def test_every_table_shows_the_seeds_spread(tmp_path, capsys):
    two_seeds(tmp_path)  # hand-computed: H(80, 60) = 68.571, H(70, 40) = 50.909, their stdev 12.489; H(75, 50) = 60
    for i, acc in enumerate((70.0, 74.0), 1):
        write(tmp_path / f"fs{i}", setting="fewshot", method="coop", dataset="dtd", shots=4, seed=i, acc=acc)
    ev.tables([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| coop | dtd | 75.00 ± 7.07 | 50.00 ± 14.14 | 60.00 ± 12.49 | 2 seeds |" in out
    assert "| dtd 4-shot | 72.00 ± 2.83 (2) |" in out


def test_csv_gives_each_number_with_its_spread(tmp_path, capsys):
    two_seeds(tmp_path)
    ev.tables([str(tmp_path), "--format", "csv"])
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["setting", "method", "dataset", "metric", "mean", "std", "seeds"]
    assert ["base2new", "coop", "dtd", "H", "60.0000", "12.4892", "2"] in rows
    assert ["base2new", "coop", "dtd", "base", "75.0000", "7.0711", "2"] in rows


def test_paper_puts_the_published_number_beside_ours_and_marks_what_is_far(tmp_path, capsys):
    two_seeds(tmp_path, seeds=((90.0, 49.0), (91.0, 50.0)), args={"epochs": 10, "batch_size": 4, "lr": 0.0035},
              backbone="ViT-B/16")  # CaPT's CoOp on DTD: 78.70 / 49.47 / 60.75
    ev.tables([str(tmp_path), "--paper"])
    out = capsys.readouterr().out
    base = next(line for line in out.splitlines() if "| coop | dtd | base |" in line)
    new = next(line for line in out.splitlines() if "| coop | dtd | new |" in line)
    assert "| 78.70 | 90.50 | +11.80 ** | 0.71 | 2 | ViT-B/16 | 16 | 10 ep, batch 4, lr 0.0035 | abababab |" in base
    assert "| 49.47 | 49.50 | +0.03 | 0.71 |" in new and "**" not in new.split("|")[6]
    assert "CaPT (arXiv 2506.23856)" in out and "ViT-B/16, 16 shots, seeds 1-3" in out


def test_paper_averages_davpts_fgvc_sets_and_says_when_nothing_compares(tmp_path, capsys):
    for i, d in enumerate(["cub", "nabirds", "flowers", "dogs", "cars"]):
        write(tmp_path / d, setting="fewshot", method="davpt", dataset=d, shots="all", seed=1, acc=88.0 + i)
    ev.tables([str(tmp_path), "--paper"])
    out = capsys.readouterr().out
    assert "| davpt | fgvc mean | acc | 91.22 | 90.00 | -1.22 | – | - |" in out  # (88+89+90+91+92)/5
    assert "| davpt | cub | acc | 90.20 | 88.00 | -2.20 | – | 1 |" in out
    world = tmp_path / "world"
    two_seeds(world, dataset="world")
    ev.tables([str(world), "--paper"])
    assert "No run here has a published counterpart" in capsys.readouterr().out
