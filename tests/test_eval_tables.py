"""eval.py's tables on hand-written results.json folders: a diverged seed (NaN) is named and shows n/a."""
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
