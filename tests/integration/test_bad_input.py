"""Bad input gets a clear answer: one line naming the problem, exit status 2, no traceback,
before any round runs (a table of bad inputs through the command line's ``main``, in-process;
tests/integration/test_runtimes.py runs a few through the installed ``hfedmoe`` executable)."""

from pathlib import Path

import pytest

from hfedmoe.cli import main

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

BAD_INPUTS = [
    # (extra arguments, fragment the one-line message must contain)
    (["--set", "num-server-rounds=0"], "'num-server-rounds' = 0"),
    (["--set", "num-server-round=3"], "did you mean 'num-server-rounds'"),
    (["--set", "method=fedprox"], "'method' = 'fedprox'"),
    (["--set", "seed=-1"], "'seed' = -1"),
    (["--set", "train.lr=0"], "'train.lr' = 0.0"),
    (["--set", "train.batch-size=many"], "'train.batch-size' = 'many'"),
    (["--set", "train.fraction-train=0"], "'train.fraction-train'"),
    (["--set", "model.top-k=9"], "'model.top-k' = 9"),
    (["--set", "model.name=tiny:llama4_text"], "llama4_text"),
    (["--set", "model.name=/nonexistent/model"], "/nonexistent/model"),
    (["--set", "model.device=tpu"], "'model.device'"),
    (["--set", "data.dirichlet-alpha=0"], "'data.dirichlet-alpha' = 0.0"),
    (["--set", "data.partition=shards"], "'data.partition' = 'shards'"),
    (["--set", "data.num-clients=5000"], "5000 clients"),
    (["--set", "data.partition=pathological", "--set", "data.classes-per-client=9"],
     "data.classes-per-client = 9"),
    (["--set", "data.min-partition-size=600"], "data.min-partition-size = 600 for "
                                               "data.num-clients = 3 needs 1800 training"),
    (["--set", "data.partition=pathological", "--set", "data.classes-per-client=1",
      "--set", "data.num-clients=2"], "leaves classes 'politics', 'sports', 'tech' on no client"),
    (["--set", "data.partition=pathological", "--set", "data.classes-per-client=5",
      "--set", "data.num-clients=400", "--set", "data.max-examples=500"],
     "class 'business' would be split over more clients"),
    (["--set", "data.source=file"], "'data.path'"),
    (["--set", "data.source=file", "--set", "data.path=/nonexistent/data.jsonl"], "data.jsonl"),
    (["--set", "data.source=file", "--set", f"data.path={FIXTURES / 'tiny.jsonl'}",
      "--set", "data.label-field=category"], "category"),
    (["--set", "data.source=wordnet", "--set", "data.path=/nonexistent/wordnet"],
     "'/nonexistent/wordnet' does not exist; install it with `make bench-setup`"),
    (["--set", "data.max-examples=3"], "data.max-examples = 3 is below the 10"),
    (["--set", "budget.experts=0"], "'budget.experts' = '0'"),
    (["--set", "budget.experts=12,banana"], "banana"),
    (["--set", "budget.experts=mem=1KB"], "needs"),
    (["--set", "budget.per-layer=-1"], "'budget.per-layer' = -1"),
    (["--set", "budget.experts=2,999"], "budget 999 exceeds the model's"),
    (["--set", "budget.experts=1"], "below the minimum of 2"),
    (["--set", "federation.min-replies=4"], "'federation.min-replies' = 4"),
    (["--set", "robust.aggregation=median"], "'robust.aggregation' = 'median'"),
    (["--set", "faults.attackers=7"], "'faults.attackers' = '7'"),
    (["--set", "data.client-test-fraction=1"], "'data.client-test-fraction' = 1.0"),
    (["--set", "hfedmoe.lambda=1.5"], "'hfedmoe.lambda' = 1.5"),
    (["--set", "hfedmoe.beta=-0.1"], "'hfedmoe.beta' = -0.1"),
    (["--set", "hfedmoe.tau=2"], "'hfedmoe.tau' = 2.0"),
    (["--set", "hfedmoe.expert-step=all"], "'hfedmoe.expert-step' = 'all'"),
    (["--config", "missing.toml"], "does not exist"),
    # non-finite numbers are refused for every float key
    (["--set", "train.lr=inf"], "'train.lr' = inf is invalid: expected a finite number"),
    (["--set", "train.lr=nan"], "'train.lr' = nan"),
    (["--set", "hfedmoe.tau=nan"], "'hfedmoe.tau' = nan"),
    (["--set", "data.test-fraction=-inf"], "'data.test-fraction' = -inf"),
    (["--set", "train.weight-decay=1e999"], "'train.weight-decay' = inf"),
    # model limits, checked before anything runs
    (["--set", "model.max-length=1024"], "'model.max-length' = 1024 is invalid: expected an "
                                         "integer <= 512"),
    # a method that cannot train anyone under the budgets
    (["--set", "method=fedavg-drop", "--set", "budget.experts=50%"],
     "method 'fedavg-drop' lets no client train"),
    # data files in the wild
    (["--set", "data.source=file", "--set", f"data.path={FIXTURES / 'cp1252.csv'}"],
     "cp1252.csv':3: byte 0xE9 is not valid utf-8"),
    (["--set", "data.source=file", "--set", f"data.path={FIXTURES / 'null_label.jsonl'}"],
     "null_label.jsonl':4: field 'label' is null"),
    (["--set", "data.encoding=klingon"], "'data.encoding' = 'klingon'"),
    (["--set", "train.lr"], "key=value"),
]


@pytest.mark.parametrize("args, fragment", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(ROOT)
    earlier = _finished_run(tmp_path / "out")
    status = main(["run", "--config", "conf/tiny.toml", *args, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert status == 2, out[-2000:] + err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfedmoe: error:"), err[-2000:]
    assert fragment in lines[0]
    assert "round 1/" not in out  # refused before any training
    assert _files(tmp_path / "out") == earlier  # and before anything on disk was touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _finished_run(out: Path) -> dict[str, bytes]:
    """Stand-in files of an earlier finished run in ``out``; returns their contents."""
    for name, text in (("config.toml", "seed = 3\n"), ("metrics.jsonl", '{"round": 0}\n'),
                       ("summary.json", "{}\n"), ("checkpoints/round-000001/COMMIT", "")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return _files(out)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
