"""README.md against the code at HEAD: its python examples run and give what they say, every command it gives parses
with the flags it shows, the signatures it writes out are the functions', the files it names exist and the figures
it quotes from ``benchmarks/example`` are those files'."""
import argparse
import ast
import functools
import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import kernels
from benchmarks.__main__ import COMMANDS as BENCH_COMMANDS
from kernels import reference
from tolerance import assert_close

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def fenced(language: str):
    """The README's ``` blocks in ``language`` (indented ones inside list items too), dedented, in order."""
    return [textwrap.dedent(m.group(3)) for m in FENCE.finditer(README) if m.group(2) == language]


def prose() -> str:
    """The README without its fenced blocks (each replaced by a blank line, so paragraphs stay apart)."""
    return FENCE.sub("\n\n", README)


def spans(text: str):
    """Inline `code` spans, a span broken over lines joined by spaces."""
    return [" ".join(m.group(1).split()) for m in SPAN.finditer(text)]


# --- (1) the python examples ------------------------------------------------------------------------------------


def _run_statements(code: str, path: Path, namespace: dict) -> list:
    """Run ``code`` (written to ``path``, so ``@triton.jit`` finds its source) one top-level statement at a time in
    ``namespace``; returns (statement source, value) for each statement that assigns ``out``."""
    path.write_text(code)
    outs = []
    for statement in ast.parse(code).body:
        exec(compile(ast.Module([statement], type_ignores=[]), str(path), "exec"), namespace)
        if any(isinstance(t, ast.Name) and t.id == "out"
               for node in ast.walk(statement) if isinstance(node, ast.Assign) for t in node.targets):
            outs.append((ast.get_source_segment(code, statement), namespace["out"]))
    return outs


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Every ```python block, in order, in one namespace (a later block goes on from the earlier ones, as a reader
    does). Returns the namespace and the (statement, out) pairs."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("readme")
    namespace, outs = {"__name__": "readme_example"}, []
    for i, code in enumerate(fenced("python")):
        outs += _run_statements(code, folder / f"block{i}.py", namespace)
    return namespace, outs


def _band(n: int, width: int, device) -> torch.Tensor:
    distance = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    return (distance >= 0) & (distance < width)


def _expected(ns: dict):
    """What each `out = ...` line of the examples says it computes, as kernels.reference arguments (and whether the
    result is in flash-attn's (B, S, H, D) layout), keyed by a piece of the line."""
    same_doc = ns["doc_ids"][:, None] == ns["doc_ids"][None, :]
    return {
        "kernels.attention(q, k, v, causal=True)": (dict(causal=True), False),
        "window_size=(31, 0), softcap=30.0": (dict(causal=True, window_size=(31, 0), softcap=30.0), False),
        "flash_attn_func(": (dict(causal=True), True),
        "mask_mod=mask)": (dict(causal=True, mask=same_doc), False),
        "MaskMod(local_band, 64)": (dict(mask=_band(ns["n"], 64, ns["q"].device)), False),
    }


def test_python_examples_compute_what_they_say(examples):
    ns, outs = examples
    assert len(fenced("python")) >= 2 and len(outs) >= 5
    q, k, v = ns["q"], ns["k"], ns["v"]
    expected = _expected(ns)
    for line, out in outs:
        keys = [key for key in expected if key in line]
        assert len(keys) == 1, f"README example line {line!r}: say here what it computes (matched {keys})"
        options, flash_layout = expected[keys[0]]
        exact = reference.attention(q.double(), k.double(), v.double(), **options)
        torch_same = reference.attention(q, k, v, **options)
        if flash_layout:
            exact, torch_same = exact.transpose(1, 2), torch_same.transpose(1, 2)
        assert_close(out, exact, torch_same, name=line)


def test_example_attention_is_differentiable(examples):
    ns, _ = examples
    q = ns["q"].detach().requires_grad_()
    kernels.attention(q, ns["k"], ns["v"], causal=True).float().sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape and q.grad.isfinite().all()


def test_example_gpt_backends_share_weights_and_patch_keeps_them(examples):
    """The GPT example: "reference" | "triton" | "sdpa" on the same weights; patch(model) switches our GPT to the
    triton backend in place, the Parameter objects untouched."""
    ns, _ = examples
    model = ns["model"].to(ns["q"].device)
    assert model.config.backend == "triton"  # the example ended with patch(model)
    idx = torch.randint(0, model.config.vocab_size, (1, 24), device=ns["q"].device)
    expected, _ = model.set_backend("reference")(idx)
    torch.testing.assert_close(model.set_backend("sdpa")(idx)[0], expected, rtol=1e-5, atol=1e-5)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    ns["patch"](model)
    assert model.config.backend == "triton"
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1]), name
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)


def test_returns_as_the_readme_says(device):
    """The return values its text states: attention's lse (B, H, Nq) float32, natural log; attention_varlen's lse
    (H, total_q); add_layer_norm's (norm(x + residual), x + residual)."""
    q, k, v = (torch.randn(2, 3, 5, 16, device=device) for _ in range(3))
    out, lse = kernels.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1))
    cu = torch.tensor([0, 2, 7], dtype=torch.int32, device=device)
    packed = torch.randn(7, 3, 16, device=device)
    _, lse = kernels.attention_varlen(packed, packed, packed, cu, cu, 5, 5, return_lse=True)
    assert lse.shape == (3, 7)
    x, residual = torch.randn(4, 8, device=device), torch.randn(4, 8, device=device)
    normed, summed = kernels.add_layer_norm(x, residual, 8)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, torch.nn.functional.layer_norm(x + residual, (8,)))


# --- (2) the commands ---------------------------------------------------------------------------------------------

MAKEFILE = (ROOT / "Makefile").read_text()
SECTION_COMMANDS = {"Benchmarks": "python -m benchmarks", "GPU check": "python -m benchmarks gpu-check",
                    "GPU-target build report (no GPU needed)": "python -m benchmarks static"}
"""The command a section's bare flags (`--quick`) belong to when their paragraph names none."""


def _make_command(line: str) -> str:
    """``make TARGET [VAR=...] [ARGS="..."]`` -> the command its recipe runs (``$(ARGS)`` filled in)."""
    words = shlex.split(line)
    target, variables = words[1], dict(w.split("=", 1) for w in words[2:])
    assert re.search(rf"^{re.escape(target)}:", MAKEFILE, re.M), f"{line}: no make target {target!r}"
    for name in variables:
        assert re.search(rf"^{name} \?=", MAKEFILE, re.M), f"{line}: the Makefile has no variable {name}"
    recipe = re.search(rf"^{re.escape(target)}:.*\n\t(.*)", MAKEFILE, re.M).group(1)
    runs = re.search(r"-m (.*)\$\(ARGS\)", recipe)
    assert runs, f"{line}: its recipe {recipe!r} takes no ARGS"
    return f"python -m {runs.group(1)}{variables.get('ARGS', '')}".strip()


def _normalise(command: str) -> str:
    """A README command as ``python -m MODULE ...`` or ``pytest ...``: make targets through their recipe, torchrun
    without its own options, a benchmarks command given alone (`scaling --quick`) with its module."""
    command = command.split("#")[0].strip()
    if command.startswith("make "):
        return _make_command(command)
    if command.startswith("torchrun "):
        return "python " + command[command.index(" -m "):].strip()
    if command.split()[0] in BENCH_COMMANDS:
        return "python -m benchmarks " + command
    return command


def _mentions(text: str):
    """The commands a piece of prose names, normalised, in order."""
    for span in spans(text):
        if re.match(r"(python -m |torchrun |make (test|bench|gpu-check)\b|pytest )", span) or \
                span.split()[0] in BENCH_COMMANDS:
            yield _normalise(span)


def readme_commands():
    """Every command line the README gives: the bash blocks' lines and the inline spans."""
    lines = [line for block in fenced("bash") for line in block.splitlines() if line.split("#")[0].strip()]
    return sorted({_normalise(line) for line in lines} | set(_mentions(prose())))


def readme_flags():
    """(command, flag) for each bare flag span (`--quick`, `--batch/--heads/--head-dim`): the command is the last one
    named in its paragraph or list item (an indented paragraph goes on with its item), else its section's
    (SECTION_COMMANDS)."""
    found = []
    for section in re.split(r"^#+ ", prose(), flags=re.M)[1:]:
        heading = section.splitlines()[0].strip()
        command = None
        for paragraph in re.split(r"\n\s*\n|\n(?=\s*(?:- |\d+\. ))", section):
            if not paragraph.startswith("  "):
                command = SECTION_COMMANDS.get(heading)
            for span in spans(paragraph):
                mentioned = list(_mentions(f"`{span}`"))
                command = mentioned[0] if mentioned else command
                if span.startswith("--"):
                    assert command, f"README section {heading!r}: flag {span!r} with no command before it"
                    found += [(command, flag) for flag in re.findall(r"--[\w-]+", span)]
    return found


PARSE_ARGS = argparse.ArgumentParser.parse_args
"""argparse's own, kept before any test patches it."""


class _Parsed(Exception):
    """Raised by a parse_args that succeeded, carrying its parser: stops a main() before it runs anything."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def parse(command: str, monkeypatch, capsys) -> argparse.ArgumentParser:
    """Run ``python -m MODULE args`` in this process up to its argument parsing; returns the parser that accepted
    the arguments, or fails with argparse's message."""
    words = shlex.split(command)

    def parse_and_stop(self, args=None, namespace=None):
        PARSE_ARGS(self, args, namespace)
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    main = importlib.import_module(words[2] if words[2] != "benchmarks" else "benchmarks.__main__").main
    try:
        main(words[3:])
    except _Parsed as parsed:
        return parsed.parser
    except SystemExit as error:
        pytest.fail(f"README command {command!r}: exit {error.code}: {capsys.readouterr().err.strip()}")
    pytest.fail(f"README command {command!r} never parsed its arguments")


@functools.lru_cache(maxsize=None)
def _pytest_help(folder: str) -> str:
    """``pytest FOLDER --help``: pytest's options, its plugins' and those of FOLDER's conftest.py."""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", folder, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True).stdout


def _tests_help(config) -> str:
    """``pytest tests --help``'s options without a second process: this run's parser, which has tests/conftest.py's
    and, unless a plugin was left out (``-p no:xdist``: then that process), every installed plugin's."""
    if all(config.pluginmanager.get_plugin(plugin.name) for plugin in entry_points(group="pytest11")):
        return config._parser.optparser.format_help()  # the argparse parser of pytest 8 (after parsing) and 9
    return _pytest_help("tests")


def _pytest_words(command: str):
    words = shlex.split(command)
    return words[3:] if words[0] == "python" else words[1:]


def options(command: str, monkeypatch, capsys, config) -> str:
    """The options ``command`` accepts, as its --help text. A ``python -m`` command is parsed with its own
    arguments on the way (an argparse error fails the test); a pytest one gets its folder's help."""
    if re.match(r"(python -m )?pytest ", command):
        folder = next(w for w in _pytest_words(command) if not w.startswith("-") and (ROOT / w).is_dir())
        return _tests_help(config) if (ROOT / folder).resolve() == ROOT / "tests" else _pytest_help(folder)
    return parse(command, monkeypatch, capsys).format_help()


def _accepts(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def test_readme_commands_parse(monkeypatch, capsys, pytestconfig):
    """Every command line: a python -m one parses its arguments; a pytest one's options are all known."""
    commands = readme_commands()
    assert any("transformer.train" in c for c in commands) and any(c.startswith("pytest") for c in commands)
    for command in commands:
        help_text = options(command, monkeypatch, capsys, pytestconfig)
        if "pytest" in command:
            unknown = [w for w in _pytest_words(command) if w.startswith("-") and not _accepts(help_text, w)]
            assert not unknown, f"README command {command!r}: pytest does not know {unknown}"


def test_readme_flags_belong_to_their_commands(monkeypatch, capsys, pytestconfig):
    flags = readme_flags()
    assert ("python -m benchmarks static", "--kernel") in flags
    helps = {}
    for command, flag in flags:
        if command not in helps:
            helps[command] = options(command, monkeypatch, capsys, pytestconfig)
        assert _accepts(helps[command], flag), f"README: {command!r} has no {flag}"


def test_readme_install_and_ci_commands_exist():
    """`pip install -e ".[test,bench,hf]"`: those extras exist; `bash .ci/run`: the script exists."""
    extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', README).group(1).split(",")
    setup = (ROOT / "setup.py").read_text()
    for extra in extras:
        assert f'"{extra}":' in setup, f"setup.py has no extra {extra!r}"
    for script in re.findall(r"`bash ([\w./]+)`", README):
        assert (ROOT / script).is_file(), script


# --- (3) the API it writes out ------------------------------------------------------------------------------------

MODS = ("document_mask", "prefix_lm_mask", "softcap_score", "alibi_score")
SIGNATURE = re.compile(rf"^((?:kernels(?:\.\w+)+|{'|'.join(MODS)}))\((.*)\)$", re.S)


def _resolve(dotted: str):
    if "." not in dotted:
        return getattr(importlib.import_module("kernels.attention.mods"), dotted)
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def readme_signatures():
    """(name, parameter text) of every `kernels.f(a, b=1, *, c)` the README writes out (inline or fenced)."""
    texts = spans(prose()) + [" ".join(block.split()) for block in fenced("")]
    return [m.groups() for m in map(SIGNATURE.match, texts) if m]


UNLISTED = {"kernels.MaskMod": ("index_dims",), "kernels.ScoreMod": ("index_dims",)}
"""Keyword-only extras its usage form leaves out and the README describes elsewhere (in the limits)."""
KINDS = {inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional", inspect.Parameter.VAR_POSITIONAL: "var",
         inspect.Parameter.KEYWORD_ONLY: "keyword"}


@pytest.mark.parametrize("name, params", [pytest.param(*s, id=s[0]) for s in readme_signatures()])
def test_readme_signature_matches_the_code(name, params):
    """Names, order, keyword-only marker and the defaults the README shows (a README parameter without a default,
    or `device=...`, leaves the default unchecked; a trailing `...` leaves the rest unlisted)."""
    partial = re.search(r"(^|,)\s*\.\.\.$", params)
    written = ast.parse(f"def f({params[:partial.start()] if partial else params}): pass").body[0].args
    readme = [(a.arg, "positional") for a in written.args] + ([(written.vararg.arg, "var")] if written.vararg else [])
    readme += [(a.arg, "keyword") for a in written.kwonlyargs]
    actual = inspect.signature(_resolve(name)).parameters
    code = [(p.name, KINDS.get(p.kind)) for p in actual.values() if p.name not in UNLISTED.get(name, ())]
    assert readme == (code[:len(readme)] if partial else code), f"README's {name}({params}) vs the code's {code}"
    defaults = dict(zip([a.arg for a in written.args][::-1], written.defaults[::-1]))
    defaults.update({a.arg: d for a, d in zip(written.kwonlyargs, written.kw_defaults) if d is not None})
    for parameter, node in defaults.items():
        if not (isinstance(node, ast.Constant) and node.value is Ellipsis):
            assert ast.literal_eval(node) == actual[parameter].default, f"{name}: default of {parameter}"


# --- (4) files it names and figures it quotes ---------------------------------------------------------------------


def test_files_the_readme_names_exist():
    named = re.findall(r"(?:`|\]\()((?:kernels|transformer|benchmarks|tests)/[\w./]+?\.\w+)[`)]", README)
    assert len(named) > 10
    missing = [path for path in named if not (ROOT / path).is_file()]
    assert not missing, f"README names files that do not exist: {missing}"


def _table(heading_line: str, columns: int):
    """The rows of the markdown table right after the line containing ``heading_line``: lists of cell strings."""
    start = README.rfind("\n", 0, README.index(heading_line)) + 1
    rows = []
    for line in README[start:].splitlines():
        line = line.strip()
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == columns and not set(line) <= set("|- "):
            rows.append(cells)
    return rows[1:]  # without the header


def _shown(value: float, text: str) -> bool:
    """``text`` (e.g. '1.08×', '10', '216 MB', '10,300 (interp)') is ``value`` rounded to the digits it shows: a
    number written with thousands commas shows its trailing zeros as rounding (10,300: three digits)."""
    number = re.match(r"[\d.,]+", text).group(0)
    digits = number.replace(",", "")
    if "." in digits:
        step = 10.0 ** -len(digits.split(".")[1])
    else:
        step = 10.0 ** (len(digits) - len(digits.rstrip("0")) if "," in number else 0)
    return abs(float(digits) - value) <= 0.5 * step * (1 + 1e-9)


def test_decode_tables_match_decode_json():
    records = json.loads((ROOT / "benchmarks/example/decode.json").read_text())["records"]
    by_key = {(r["kind"], r["batch"], r["cache"]): r["paths"] for r in records}
    model_rows = _table("are a **model of an H100 SXM**", 10)
    counted_rows = _table("Bytes **counted on CPU**", 5)
    assert len(model_rows) == 6 and len(counted_rows) == 4
    for row in model_rows:
        paths = by_key[("model", int(row[0]), int(row[1]))]
        for i, path in enumerate(("decode", "training", "baseline")):
            p = paths[f"{path}@H100-SXM5"]
            assert _shown(p["bytes_vs_minimum"], row[2 + i]), (row, path)
            assert _shown(1e3 * p["roofline"]["time_ms"], row[7 + i]), (row, path)
            if path != "baseline":
                assert _shown(p["waves"], row[5 + i]), (row, path)
    for row in counted_rows:
        paths = by_key[("counted", int(row[0]), int(row[1]))]
        for i, path in enumerate(("decode", "training", "baseline")):
            assert _shown(paths[path]["bytes_vs_minimum"], row[2 + i]), (row, path)


def test_overhead_table_matches_overhead_json():
    records = json.loads((ROOT / "benchmarks/example/overhead.json").read_text())["records"]
    value = {(r["op"], r["provider"], r["pass"]): r for r in records}
    rows = _table("| op | forward µs (× minimal)", 6)
    assert len(rows) == len({r["op"] for r in records})
    for op, forward, backward, inference, torch_op, _ in rows:
        for text, key in ((forward, "forward"), (backward, "forward+backward"), (inference, "inference")):
            if text in ("no backward", "as forward"):
                assert (op, "ours", key) not in value
                continue
            us, ratio = re.fullmatch(r"([\d.]+) \(([\d.]+)×\)", text).groups()
            assert _shown(value[(op, "ours", key)]["us_per_call"], us), (op, key)
            assert _shown(value[(op, "ours", key)]["x_minimal"], ratio), (op, key)
        for text, key in zip(torch_op.split(" / "), ("forward", "forward+backward", "inference")):
            if text != "-":
                assert _shown(value[(op, "torch", key)]["us_per_call"], text), (op, "torch", key)


GROWTH_NAMES = {"baseline": "baseline", "fused kernel": "triton", "fused, 256-key window": "triton-window256",
                "fused, 8 packed documents": "triton-8docs"}
"""The fitted-growth table's provider names."""


def test_one_result_tables_match_scaling_json():
    document = json.loads((ROOT / "benchmarks/example/scaling.json").read_text())
    records = {r["provider"]: r for r in document["records"] if r["mode"] == "fwd+bwd" and r["length"] == 1024}
    rows = _table("| provider | time ms (CPU)", 7)
    assert len(rows) == 6
    for name, time, peak, vs_baseline, moved, vs_min, h100 in rows:
        r = records[name.split()[0]]
        for text, value in ((time, r["time"]["median_ms"]), (peak, r["memory"]["peak_bytes"] / 1e6),
                            (vs_baseline, r["vs_baseline"]["peak_memory"]), (moved, r["counted"]["bytes"] / 1e6),
                            (vs_min, r["counted"]["vs_min"]), (h100, r["model"]["H100-SXM5"]["time_ms"])):
            assert _shown(value, text), (name, text, value)
    fits = {f["provider"]: f["slopes"] for f in document["fits"] if f["mode"] == "fwd+bwd"}
    growth = _table("| provider | peak memory | bytes moved |", 3)
    assert len(growth) == len(GROWTH_NAMES)
    for name, memory, moved in growth:
        slopes = fits[GROWTH_NAMES[name]]
        assert _shown(slopes["peak_memory"], memory.lstrip("N^")), (name, memory)
        assert _shown(slopes["counted_bytes"], moved.lstrip("N^")), (name, moved)
