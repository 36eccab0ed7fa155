"""`lnorm lab publish`: the committed results page, its header, its plots, and the runs it refuses.

The git state is pinned by patching ``lnorm.lab.provenance`` (the tests run from checkouts with
and without uncommitted changes); ``test_source_state_is_this_checkouts`` checks the real one.
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lnorm.cli import main
from lnorm.lab import experiments, provenance, publish, report
from lnorm.lab.cli import register

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
README = Path(__file__).resolve().parents[2] / "README.md"


def clean_at(commit):
    return lambda: {"git_commit": commit, "git_dirty": False, "git_changes": [], "git_changes_count": 0}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """e2 and sanity (with the e3/e5 runs sanity reads) at the smoke suite, "made at" COMMIT_A."""
    out = tmp_path_factory.mktemp("publish") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(provenance, "source_state", clean_at(COMMIT_A))
        assert main(["lab", "run", "e2", "sanity", "--suite", "smoke", "--out", str(out), "--no-progress",
                     "--jobs", "1"]) == 0
    return out


@pytest.fixture
def run_copy(smoke_run, tmp_path, monkeypatch):
    """A copy of the smoke run, in a checkout whose lnorm source equals the run's commit."""
    monkeypatch.setattr(provenance, "differs_from", lambda commit: [])
    monkeypatch.setattr(provenance, "same_source", lambda a, b: a == b)
    dst = tmp_path / "run"
    shutil.copytree(smoke_run, dst)
    return dst


def publish_cli(run_dir, out, *flags):
    return main(["lab", "publish", str(run_dir), "--out", str(out), *flags])


def edit_env(run_dir, change):
    env = json.loads((run_dir / "env.json").read_text())
    change(env)
    (run_dir / "env.json").write_text(json.dumps(env))


def fields(page: str) -> dict:
    return dict(re.findall(r"^- \*\*([^*]+)\*\*: (.*)$", page, flags=re.M))


def test_page_header_plots_and_body(smoke_run, run_copy, tmp_path, capsys):
    docs = tmp_path / "docs"
    assert publish_cli(run_copy, docs) == 0
    page_path = docs / "smoke" / "README.md"
    assert str(page_path) in capsys.readouterr().out
    page = page_path.read_text()
    f = fields(page.split("## Claims summary")[0])
    assert page.startswith("# lnorm lab results: smoke suite\n")
    assert f["suite"] == "smoke (1 seed per configuration)"
    assert f["command"] == (f"`lnorm lab run e2 sanity --suite smoke --jobs 1 --threads 1 --device cpu "
                            f"--backend auto --out {smoke_run}`")
    assert f["git commit"] == f"`{COMMIT_A}`, lnorm source clean"
    assert f["torch"] == torch.__version__
    here = provenance.cpu()
    assert f["CPU"].startswith(here["cpu_model"] + " (") and f["CPU"].endswith(" logical cores)")
    assert (f"family {here['cpu_family']}, model {here['cpu_model_number']}" if here["cpu_family"] is not None
            else "family/model unknown") in f["CPU"]
    assert f["threads per run"] == "1" and f["jobs"] == "1" and f["device"] == "cpu"
    assert re.fullmatch(r"[\d.]+ (s|min|h) over 1 invocation; [\d.]+ (s|min|h) of compute summed over runs",
                        f["wall time"]), f["wall time"]
    n = len(list(run_copy.glob("runs/*/*/result.json")))
    assert f["runs"] == f"{n}: {n} ok, 0 diverged, 0 cannot train, 0 failed, 0 not run yet"
    assert f["experiments"] == f"4 of {len(experiments.names())}: e2, e3, e5, sanity"

    # the report's body follows: the summary first, then every experiment's tables and figures
    md = (run_copy / "report.md").read_text()
    assert page.index("## Claims summary") < page.index("## e2:") < page.index("## sanity:")
    assert page[page.index("## Claims summary"):] == md[md.index("## Claims summary"):]

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert "plots/claims_forest.png" in links and len(links) == len(set(links)) > 3
    pngs = {p.relative_to(page_path.parent).as_posix() for p in (page_path.parent / "plots").glob("*.png")}
    assert set(links) == pngs  # every link resolves, relative to the page; nothing unlinked
    from PIL import Image

    for rel in links:
        with Image.open(page_path.parent / rel) as im:
            assert im.mode == "P", rel  # palette PNG: small to commit
        assert (page_path.parent / rel).stat().st_size < 60_000, rel


def test_partial_run_says_so_at_the_top(run_copy, tmp_path):
    (lost,) = list(run_copy.glob("runs/e2/*/result.json"))[:1]
    lost.unlink()
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    page = (tmp_path / "docs/smoke/README.md").read_text()
    top = page[:page.index("- **suite**")]
    assert "**Partial run.**" in top
    missing = [n for n in experiments.names() if n not in ("e2", "e3", "e5", "sanity")]
    assert f"{len(missing)} of {len(experiments.names())} experiments of the lab were not run: " \
           f"{', '.join(missing)}" in top
    assert "e2: 1 of 2 runs have no result (0 failed, 1 not run yet)" in top
    assert ", 1 not run yet" in fields(page)["runs"]


def test_a_complete_run_has_no_gaps():
    conf = {"experiments": experiments.names()}
    results = {n: [{"status": "ok"}, {"status": "diverged"}, {"status": "cannot_train"}] for n in conf["experiments"]}
    assert publish.gaps(conf, results) == []
    results["e1"][1]["status"] = "error"
    assert publish.gaps(conf, results) == ["e1: 1 of 3 runs have no result (1 failed, 0 not run yet)"]


def test_dirty_run_is_refused_unless_allow_dirty(run_copy, tmp_path, capsys):
    def dirty(env):
        env["invocations"][0].update(git_dirty=True, git_changes=["src/lnorm/lab/stats.py"])

    edit_env(run_copy, dirty)
    docs = tmp_path / "docs"
    assert publish_cli(run_copy, docs) == 2
    err = capsys.readouterr().err
    assert "--allow-dirty" in err and "uncommitted changes" in err and "src/lnorm/lab/stats.py" in err
    assert not (docs / "smoke" / "README.md").exists()

    assert publish_cli(run_copy, docs, "--allow-dirty") == 0
    page = (docs / "smoke" / "README.md").read_text()
    top = page[:page.index("- **suite**")]
    assert "Published with `--allow-dirty`" in top and "src/lnorm/lab/stats.py" in top
    assert fields(page)["git commit"] == f"`{COMMIT_A}` with uncommitted changes in the lnorm source"


def _resume_at(run_dir, commit, monkeypatch, drop=1):
    for p in list(run_dir.glob("runs/e2/*/result.json"))[:drop]:
        p.unlink()
    monkeypatch.setattr(provenance, "source_state", clean_at(commit))
    assert main(["lab", "run", "e2", "sanity", "--suite", "smoke", "--out", str(run_dir), "--no-progress",
                 "--jobs", "1"]) == 0


def test_run_resumed_at_another_commit_is_refused(run_copy, tmp_path, monkeypatch, capsys):
    _resume_at(run_copy, COMMIT_B, monkeypatch)
    invs = json.loads((run_copy / "env.json").read_text())["invocations"]
    assert [(i["git_commit"], i["to_run"], i["finished"]) for i in invs] == [(COMMIT_A, 15, True), (COMMIT_B, 1, True)]
    capsys.readouterr()
    assert publish_cli(run_copy, tmp_path / "docs") == 2
    err = capsys.readouterr().err
    assert "mixed commits" in err and COMMIT_B[:12] in err and "--allow-dirty" in err

    monkeypatch.setattr(provenance, "same_source", lambda a, b: True)  # B changed only docs: one source
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    page = (tmp_path / "docs/smoke/README.md").read_text()
    assert fields(page)["git commit"] == f"`{COMMIT_A}` (resumed at `{COMMIT_B[:12]}`), lnorm source clean"
    assert fields(page)["wall time"].split(";")[0].endswith("over 2 invocations")


def test_rerun_with_nothing_to_do_does_not_mix_commits(run_copy, tmp_path, monkeypatch):
    _resume_at(run_copy, COMMIT_B, monkeypatch, drop=0)
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    assert fields((tmp_path / "docs/smoke/README.md").read_text())["git commit"] == f"`{COMMIT_A}`, lnorm source clean"


def test_resume_of_a_run_with_no_recorded_commit_is_refused(run_copy, tmp_path, monkeypatch, capsys):
    """Runs finished before the commit was recorded stay of unknown commit after a resume at a clean one."""
    edit_env(run_copy, lambda env: env.pop("invocations"))
    _resume_at(run_copy, COMMIT_A, monkeypatch, drop=0)
    capsys.readouterr()
    assert publish_cli(run_copy, tmp_path / "docs") == 2
    err = capsys.readouterr().err
    assert "recorded no commit" in err and "--allow-dirty" in err


def test_checkout_that_differs_from_the_run_is_refused(run_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(provenance, "differs_from", lambda commit: ["src/lnorm/lab/claims.py"])
    assert publish_cli(run_copy, tmp_path / "docs") == 2
    err = capsys.readouterr().err
    assert f"check out {COMMIT_A[:12]}" in err and "src/lnorm/lab/claims.py" in err and "--allow-dirty" in err


@pytest.mark.parametrize("change,needle", [
    (lambda env: env.pop("invocations"), "records no commit"),
    (lambda env: env["invocations"][0].update(git_commit=None, git_dirty=None), "outside a git checkout"),
], ids=["older-run", "no-git"])
def test_run_without_a_commit_is_refused(run_copy, tmp_path, capsys, change, needle):
    edit_env(run_copy, change)
    assert publish_cli(run_copy, tmp_path / "docs") == 2
    err = capsys.readouterr().err
    assert needle in err and "--allow-dirty" in err


def test_publish_of_a_missing_dir_is_an_error(tmp_path, capsys):
    assert publish_cli(tmp_path / "nothing", tmp_path / "docs") == 2
    assert "not a lab run directory" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["out-is-a-file", "under-a-file", "suite-is-a-file"])
def test_out_that_is_not_a_directory_is_a_one_line_error(run_copy, tmp_path, capsys, where):
    # --out naming a file ended in a NotADirectoryError traceback
    f = tmp_path / "f"
    f.write_text("not a directory")
    out = {"out-is-a-file": f, "under-a-file": f / "docs", "suite-is-a-file": tmp_path / "docs"}[where]
    if where == "suite-is-a-file":
        out.mkdir()
        (out / "smoke").write_text("not a directory")
    assert publish_cli(run_copy, out, "--allow-dirty") == 2
    err = capsys.readouterr().err
    assert err.startswith("lnorm lab publish: error: --out ") and err.count("\n") == 1, err
    assert str(out) in err and f.read_text() == "not a directory"


def test_command_recorded_is_the_run_reparsed():
    import argparse

    cmd = provenance.command(["e1", "e3"], experiments.names(), suite="quick", seeds=4, jobs=2, threads=1,
                             out="runs/my run", device="cpu", backend="torch", sets=["e3.steps=400"])
    ap = argparse.ArgumentParser(prog="lnorm")
    register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(shlex.split(cmd)[1:])
    assert (args.experiments, args.suite, args.seeds, args.jobs, args.threads, str(args.out), args.backend,
            args.sets) == (["e1", "e3"], "quick", 4, 2, 1, "runs/my run", "torch", ["e3.steps=400"])
    everything = provenance.command(experiments.names(), experiments.names(), suite="full", seeds=None, jobs=2,
                                    threads=1, out="runs/lab-full", device="cpu", backend="auto", sets=[])
    assert everything.startswith("lnorm lab run --suite full ") and "--seeds" not in everything


def test_source_state_is_this_checkouts():
    pkg = provenance.PACKAGE
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True, text=True)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=pkg, capture_output=True)
    state = provenance.source_state()
    if head.returncode or tracked.returncode:
        assert state["git_commit"] is None
        return
    assert state["git_commit"] == head.stdout.strip() and re.fullmatch(r"[0-9a-f]{40}", state["git_commit"])
    status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=pkg, capture_output=True, text=True)
    assert state["git_dirty"] == bool(status.stdout.strip())


def test_list_prints_each_suites_total(capsys):
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    totals = {s: sum(getattr(experiments.get(n), "EST_SECONDS", {}).get(s, 0) for n in experiments.names())
              for s in ("smoke", "quick", "full")}
    assert "; ".join(f"{s}: {report.duration(t)}" for s, t in totals.items()) in out


def test_readme_links_the_pages_and_states_the_full_suites_time():
    text = README.read_text()
    assert "(docs/lab-results/full/README.md)" in text and "(docs/lab-results/quick/README.md)" in text
    hours = float(re.search(r"The full suite takes\s+about ([\d.]+) hours", text).group(1))
    total = sum(getattr(experiments.get(n), "EST_SECONDS", {}).get("full", 0) for n in experiments.names())
    assert abs(hours - total / 3600) <= 0.5, (f"README says the full suite takes about {hours} hours; "
                                             f"the experiments' EST_SECONDS sum to {report.duration(total)}")


def test_an_experiment_with_no_finished_run_reads_not_run(run_copy, tmp_path):
    # a partial full-suite page showed claims of experiments that had not started as
    # "inconclusive: no values on one side", as if they had run and not decided
    for p in run_copy.glob("runs/e2/*/result.json"):
        p.unlink()
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    page = (tmp_path / "docs/smoke/README.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in page.splitlines() if line.startswith("| C")}
    for claim in ("C1", "C2"):  # e2's primary tests
        assert " | not run | " in rows[claim] and "inconclusive" not in rows[claim], rows[claim]
    assert "Not run yet" in page


# ------------------------------------------------- the CPU: model name, family and model (generation)
ZEN4 = {"model_name": "AMD EPYC 9R14 96-Core Processor", "vendor": "AuthenticAMD", "family": "25", "model": "17"}
CPUINFO_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx2

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: not the first block
"""


def test_cpu_model_reads_family_and_model_of_the_first_processor(tmp_path):
    from lnorm.bench import rnn as bench_rnn
    from lnorm.utils import cpu_model

    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO_ZEN3)
    assert cpu_model(str(path)) == {"model_name": "AMD EPYC 7B13", "vendor": "AuthenticAMD", "family": "25",
                                    "model": "1"}
    assert set(cpu_model(str(tmp_path / "absent"))) == {"model_name"}  # no /proc/cpuinfo: platform's name
    assert bench_rnn.cpu_model is cpu_model is provenance.cpu_model  # one reader for the bench and the lab


def test_env_json_records_cpu_family_and_model(smoke_run, monkeypatch):
    from lnorm.lab import runner

    monkeypatch.setattr(provenance, "cpu_model", lambda: dict(ZEN4))
    env = runner.environment("cpu", 1, 1)
    assert (env["cpu_model"], env["cpu_vendor"], env["cpu_family"], env["cpu_model_number"]) == \
        ("AMD EPYC 9R14 96-Core Processor", "AuthenticAMD", "25", "17")
    monkeypatch.setattr(provenance, "cpu_model", lambda: {"model_name": "arm64"})  # no numbers to read
    assert provenance.cpu()["cpu_family"] is None and provenance.cpu()["cpu_model_number"] is None
    # a real run writes them, at the top and in each invocation's entry (a resume may be elsewhere)
    written = json.loads((smoke_run / "env.json").read_text())
    for entry in (written, *written["invocations"]):
        assert {"cpu_model", "cpu_vendor", "cpu_family", "cpu_model_number"} <= set(entry), entry


def _set_cpu(env, **fields):
    for entry in (env, *env.get("invocations", [])):
        entry.update(fields, cpu_count=2)


@pytest.mark.parametrize("fields,line", [
    ({"cpu_model": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_family": "25", "cpu_model_number": "1"},
     "AMD EPYC (family 25, model 1; 2 logical cores)"),
    ({"cpu_model": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_family": "26", "cpu_model_number": "2"},
     "AMD EPYC (family 26, model 2; 2 logical cores)"),
    ({"cpu_model": "arm64", "cpu_vendor": None, "cpu_family": None, "cpu_model_number": None},
     "arm64 (family/model unknown; 2 logical cores)"),
], ids=["zen3", "zen5", "unknown"])
def test_page_cpu_line_names_family_and_model(run_copy, tmp_path, fields, line):
    edit_env(run_copy, lambda env: _set_cpu(env, **fields))
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    assert fields_of_page(tmp_path)["CPU"] == line


def test_older_env_json_without_family_and_model_still_publishes(run_copy, tmp_path):
    def older(env):  # as written before the numbers were recorded
        _set_cpu(env, cpu_model="AMD EPYC")
        for entry in (env, *env["invocations"]):
            for k in ("cpu_vendor", "cpu_family", "cpu_model_number"):
                entry.pop(k, None)

    edit_env(run_copy, older)
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    assert fields_of_page(tmp_path)["CPU"] == "AMD EPYC (family/model not recorded; 2 logical cores)"
    report.analyze(run_copy)  # the report reads it too


def test_page_cpu_line_says_when_invocations_ran_on_different_generations(run_copy, tmp_path):
    def two(env):
        _set_cpu(env, cpu_model="AMD EPYC", cpu_family="25", cpu_model_number="1")
        env["invocations"].append({**env["invocations"][0], "cpu_family": "25", "cpu_model_number": "17"})

    edit_env(run_copy, two)
    assert publish_cli(run_copy, tmp_path / "docs") == 0
    assert fields_of_page(tmp_path)["CPU"] == ("AMD EPYC (family 25, model 1) / AMD EPYC (family 25, model 17) "
                                               "(differs between invocations); 2 logical cores")


def fields_of_page(tmp_path) -> dict:
    page = (tmp_path / "docs/smoke/README.md").read_text()
    return fields(page.split("## Claims summary")[0])


def test_analysis_here_names_both_commits(run_copy, tmp_path, monkeypatch, capsys):
    # runs made at COMMIT_A, analysed by a clean checkout at COMMIT_B whose source differs: refused
    # without the flag; with --analysis-here the page names both commits and the files between
    monkeypatch.setattr(provenance, "differs_from", lambda commit: ["src/lnorm/lab/claims.py"])
    monkeypatch.setattr(provenance, "source_state", clean_at(COMMIT_B))
    docs = tmp_path / "docs"
    assert publish_cli(run_copy, docs) == 2
    capsys.readouterr()
    assert publish_cli(run_copy, docs, "--analysis-here") == 0
    page = (docs / "smoke" / "README.md").read_text()
    top = page.split("## ")[0]
    assert "Analysed at another commit" in top and f"made at `{COMMIT_A[:12]}`" in top
    assert f"analysis of `{COMMIT_B[:12]}`" in top and "`src/lnorm/lab/claims.py`" in top
    assert fields(page)["analysis at"].startswith(f"`{COMMIT_B}`")
    assert COMMIT_A in fields(page)["git commit"] and "allow-dirty" not in top
    assert fields(page)["published"].endswith(" --analysis-here`")


def test_analysis_here_needs_a_clean_checkout_and_clean_runs(run_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(provenance, "differs_from", lambda commit: ["src/lnorm/lab/claims.py"])
    monkeypatch.setattr(provenance, "source_state", lambda: {"git_commit": COMMIT_B, "git_dirty": True,
                                                             "git_changes": ["x"], "git_changes_count": 1})
    assert publish_cli(run_copy, tmp_path / "docs", "--analysis-here") == 2
    assert "needs this checkout's lnorm source to be a clean commit" in capsys.readouterr().err
    monkeypatch.setattr(provenance, "source_state", clean_at(COMMIT_B))
    edit_env(run_copy, lambda env: env["invocations"][0].update(git_dirty=True, git_changes=["src/lnorm/x.py"]))
    assert publish_cli(run_copy, tmp_path / "docs", "--analysis-here") == 2
    assert "uncommitted changes" in capsys.readouterr().err
