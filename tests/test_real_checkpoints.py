"""Hub-style checkpoints: bf16 weights, another family than the default, parameters from the command line.

The checkpoint here is the ``smoke-mixtral`` zoo model cast to bfloat16 and saved as a plain Hugging Face
checkpoint, as every hub checkpoint is stored. Every notebook's smoke preset runs on it (the model stays
in bf16 on the CPU, so any tensor moelab creates in another dtype shows up as it would on a GPU), and the
checkpoint helpers are checked for the dtype they write and the size they report.
"""

import json
import math

import pytest
import torch

from moelab import compress, data, io, models, observe, prune, runner, zoo


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory):
    """A Mixtral-family checkpoint stored in bfloat16 (config.json says so), with its tokenizer."""
    model, tok = zoo.load("smoke-mixtral", fast_kernel=False)
    out = tmp_path_factory.mktemp("hub") / "mixtral-smoke-bf16"
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


def _observed(path, dtype=None):
    model, tok = zoo.load(str(path), dtype=dtype)
    calib = data.calibration_set(tok, "1:1:1", tokens=2048, seq_len=128)
    return model, tok, calib, observe.observe(model, calib, sample_size=64, progress=False)


def test_bf16_checkpoint_loads_in_its_own_dtype(bf16_checkpoint):
    model, _ = zoo.load(str(bf16_checkpoint))
    assert io.model_dtype(model) == torch.bfloat16 and model.moelab_source_dtype == torch.bfloat16
    assert model.config.model_type == "mixtral"


def test_pruned_in_float32_is_saved_in_the_source_dtype_and_smaller(bf16_checkpoint, tmp_path, one_thread):
    """A bf16 source loaded in float32 for CPU numerics and pruned 8 -> 4 writes bf16 again: smaller."""
    model, tok, calib, obs = _observed(bf16_checkpoint, dtype="float32")
    pruned, _ = prune.prune(model, obs, "frequency", num_experts=4)
    check = io.save_and_check(pruned, tmp_path / "pruned", tok, check_ids=calib[:2]["input_ids"],
                              source=bf16_checkpoint)
    assert check["saved_dtype"] == "bfloat16" and check["model_dtype"] == "float32"
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["dtype"] == "bfloat16"
    assert check["original_bytes"] == io.checkpoint_bytes(bf16_checkpoint)
    assert check["bytes"] < check["original_bytes"], check
    assert check["top1_agreement"] >= 0.9 and "rounding" in check["compared"]
    # told otherwise, it keeps float32
    kept = io.save_and_check(pruned, tmp_path / "f32", tok, check_ids=calib[:2]["input_ids"], dtype=None)
    assert kept["saved_dtype"] == "float32" and kept["max_logit_diff"] <= 1e-4


def test_bf16_variant_reloads_with_the_same_logits(bf16_checkpoint, tmp_path, one_thread):
    """In bf16, the reload runs the same kernel on the same device: the logits agree exactly."""
    model, tok, calib, obs = _observed(bf16_checkpoint)
    merged, _ = compress.merge_into_nearest_model(model, obs, 4, align="activations")
    assert io.model_dtype(merged) == torch.bfloat16
    check = io.save_and_check(merged, tmp_path / "merged", tok, check_ids=calib[:2]["input_ids"],
                              source=bf16_checkpoint)
    assert check["saved_dtype"] == "bfloat16" and check["top1_agreement"] == 1.0
    assert check["max_logit_diff"] == 0.0, check
    assert check["bytes"] < check["original_bytes"]


def test_save_and_check_catches_a_changed_weight(bf16_checkpoint, tmp_path, monkeypatch, one_thread):
    model, tok, calib, obs = _observed(bf16_checkpoint)
    real = models.load_model

    def tampered(*args, **kwargs):
        m = real(*args, **kwargs)
        with torch.no_grad():
            next(m.parameters()).add_(1.0)
        return m

    monkeypatch.setattr(models, "load_model", tampered)
    with pytest.raises(ValueError, match="differs from the model's"):
        io.save_and_check(model, tmp_path / "copy", tok, check_ids=calib[:1]["input_ids"], dtype=None)


def test_methods_keep_the_model_dtype(bf16_checkpoint, one_thread):
    """Every method's variant of a bf16 model is a bf16 model (no float32 tensors slip in)."""
    model, tok, calib, obs = _observed(bf16_checkpoint)
    variants = {
        "dern": compress.dern_model(model, obs, 4, iters=3)[0],
        "naee": compress.naee_model(model, obs, 4, exhaustive_limit=10)[0],
        "ream": compress.ream_model(model, calib, 4, sample_size=64)[0],
        "hc_smoe": compress.hc_smoe_model(model, obs, 4)[0],
        "slim": compress.slim_model(model, obs, remove_layers=1, width_ratio=0.5, num_experts=4)[0],
    }
    ids = torch.as_tensor(calib[:1]["input_ids"])
    for name, v in variants.items():
        dtypes = {p.dtype for p in v.parameters() if p.is_floating_point()}
        assert dtypes == {torch.bfloat16}, (name, dtypes)
        with torch.no_grad():
            assert torch.isfinite(v(input_ids=ids).logits.float()).all(), name


def test_low_rank_sparse_residual_runs_in_bf16(bf16_checkpoint, one_thread):
    """CPU CSR matmuls have no bf16 kernel: the residual runs in float32 and is cast back."""
    model, tok, calib, obs = _observed(bf16_checkpoint)
    lrs = compress.low_rank_sparse_model(model, 0.9, rank_fraction=0.25)[0]
    ids = torch.as_tensor(calib[:1]["input_ids"])
    with torch.no_grad():
        dense = lrs(input_ids=ids).logits.float()
        compress.use_csr(lrs)
        sparse = lrs(input_ids=ids).logits.float()
    assert torch.isfinite(sparse).all()
    assert float((dense.argmax(-1) == sparse.argmax(-1)).float().mean()) >= 0.95


# ----------------------------------------------------------------------------- runner parameters
def test_runner_parses_parameters_and_refuses_unknown_names(tmp_path):
    assert runner.parse_assignments(["DTYPE=bfloat16", "SEEDS=[0, 1]", "DEVICE_MAP=null", "EXPERT_KEEP=0.25"]) == {
        "DTYPE": "bfloat16", "SEEDS": [0, 1], "DEVICE_MAP": None, "EXPERT_KEEP": 0.25}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        runner.parse_assignments(["DTYPE"])
    with pytest.raises(SystemExit, match=r"unknown parameter\(s\) \['NO_SUCH'\]"):
        runner.main(["--notebook", "00", "--preset", "smoke", "-p", "NO_SUCH=1"])
    with pytest.raises(SystemExit, match="set by the runner"):
        runner.main(["--notebook", "00", "--preset", "smoke", "-p", "FIGURES_DIR=/tmp/x"])
    params = tmp_path / "p.yaml"
    params.write_text("[1, 2]\n")
    with pytest.raises(SystemExit, match="must hold a mapping"):
        runner.main(["--params", str(params)])
    assert runner.run_dir("smoke", {}) == runner.ROOT / "runs" / "smoke"
    assert runner.run_dir("full", {"MODEL": "x"}) != runner.run_dir("full", {"MODEL": "y"})


def test_every_preset_names_only_declared_parameters():
    """Each preset file (the paper presets included) sets only parameters its notebook declares."""
    for nb in runner.notebooks():
        names = set(runner.declared(nb))
        for preset in runner.PRESETS:
            unknown = set(runner.parameters(nb, preset)) - names
            assert not unknown, (nb.stem, preset, unknown)
    for nb in runner.notebooks():
        assert runner.parameters(nb, "paper").get("MODEL") not in zoo.RECIPES, nb.stem  # a real checkpoint


# ----------------------------------------------------------------------------- notebooks on a bf16 checkpoint
NOTEBOOKS = runner.notebooks()


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_smoke_run_on_a_bf16_checkpoint(nb, bf16_checkpoint):
    """The smoke preset with only MODEL changed (as a user points a notebook at a hub checkpoint)."""
    published = {p.name: p.stat().st_mtime_ns for p in (runner.ROOT / "figures").glob("*.png")}
    out = runner.run("smoke", only=nb.stem, progress=False, overrides={"MODEL": str(bf16_checkpoint)})
    assert out.name.startswith("smoke-") and out != runner.ROOT / "runs" / "smoke"
    rec = json.loads((out / nb.stem / "metrics.json").read_text())
    head = rec["metrics"]["headline"]
    assert head and all(isinstance(v, (int, float)) and math.isfinite(v) for v in head.values()), head
    assert rec["parameters"]["MODEL"] == str(bf16_checkpoint)
    assert list((out / "figures").glob(f"{nb.stem[:2]}_*.png")), "figures go to the run directory"
    assert {p.name: p.stat().st_mtime_ns for p in (runner.ROOT / "figures").glob("*.png")} == published
    ckpt = rec["metrics"].get("checkpoint")
    if ckpt:  # notebooks 01-04 write a compressed checkpoint: bf16 like the source, and smaller
        assert ckpt["saved_dtype"] == "bfloat16" and ckpt["bytes"] < ckpt["original_bytes"], ckpt
    assert "found" in rec["metrics"]


def test_runner_checks_types_and_whole_notebook_numbers():
    with pytest.raises(SystemExit, match="CALIB_TOKENS='many'.*give a int"):
        runner.main(["--notebook", "00", "--preset", "smoke", "-p", "CALIB_TOKENS=many"])
    with pytest.raises(SystemExit, match="no notebook matches '0'"):
        runner.notebooks("0")
    assert [p.stem[:2] for p in runner.notebooks(["02", "00"])] == ["00", "02"]


def test_a_failing_notebook_is_named_and_marked_in_the_summary(tmp_path):
    with pytest.raises(runner.NotebookFailed, match=r"00_anatomy_of_an_moe: FileNotFoundError.*no checkpoint at"):
        runner.run("smoke", only="00", out_root=tmp_path / "run", progress=False,
                   overrides={"MODEL": str(tmp_path / "no-such-checkpoint")})
    summary = (tmp_path / "run" / "SUMMARY.md").read_text()
    assert "**FAILED** in this run: FileNotFoundError" in summary and "00_anatomy_of_an_moe.ipynb" in summary


def test_zoo_names_a_missing_path_or_a_typo():
    with pytest.raises(FileNotFoundError, match="no checkpoint at /no/such/dir"):
        zoo.resolve("/no/such/dir")
    with pytest.raises(FileNotFoundError, match="'smoek' is no zoo model .*smoke"):
        zoo.resolve("smoek")
    assert zoo.resolve("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"  # a hub id passes through
