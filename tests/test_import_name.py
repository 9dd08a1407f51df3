"""The import name ``kernels`` is also Hugging Face's hub kernels' (distribution "kernels"): transformers must not
take this package for it, and ``import kernels`` says so when both are installed (a fake "kernels" distribution on
sys.path, in a subprocess)."""
import os
import shutil
import subprocess
import sys

import pytest

import kernels
from kernels import _runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
HUB_METADATA = "Metadata-Version: 2.1\nName: kernels\nVersion: 0.0\n"


def run_python(code: str, *path: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with ``path`` first on sys.path, then the repository."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path), ROOT]))
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def fake_hub_distribution(directory) -> None:
    """A "kernels" 0.0 distribution's metadata in ``directory``, claiming the top-level package ``kernels``."""
    info = directory / "kernels-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(HUB_METADATA)
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\nkernels-0.0.dist-info/METADATA,,\n")


def test_transformers_does_not_take_this_package_for_hub_kernels():
    pytest.importorskip("transformers")
    done = run_python("import kernels\nfrom transformers.utils.import_utils import is_kernels_available\n"
                      "print(is_kernels_available())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert "import name" not in done.stderr


def test_import_kernels_alone_warns_nothing():
    done = run_python("import kernels")
    assert done.returncode == 0, done.stderr
    assert "import name" not in done.stderr


def test_hub_kernels_installed_beside_this_package_are_named_in_a_warning(tmp_path):
    fake_hub_distribution(tmp_path)
    done = run_python("import kernels\nprint(kernels.__distribution__)", tmp_path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["transformer-kernels"]
    assert "RuntimeWarning" in done.stderr
    warning = " ".join(done.stderr.split())
    for words in (f'"kernels" 0.0 (Hugging Face\'s hub kernels, in {tmp_path})', "installed beside transformer-kernels",
                  "import name `kernels`", "separate virtualenvs", "pip uninstall kernels",
                  "transformers 5.25 and later require the hub kernels", "keep transformers<5.25",
                  "pip uninstall transformer-kernels"):
        assert words in warning


def test_another_kernels_package_over_this_ones_files_raises_import_error(tmp_path):
    """pip installed both into one directory, the hub kernels last: their __init__.py beside this package's
    modules. Importing one of those (as transformer/ does) raises an ImportError naming both distributions."""
    fake_hub_distribution(tmp_path)
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "__init__.py").write_text('"""Hugging Face\'s hub kernels, standing in."""\n')
    shutil.copy(_runtime.__file__, package / "_runtime.py")
    done = run_python("import kernels._runtime", tmp_path, cwd=tmp_path)
    assert done.returncode != 0
    error = " ".join(done.stderr.split())
    for words in (f"ImportError: `import kernels` found {package / '__init__.py'}, which is not the package of "
                  f"transformer-kernels, yet a module of transformer-kernels ({package / '_runtime.py'})",
                  f'"kernels" 0.0 (Hugging Face\'s hub kernels, in {tmp_path})',
                  "has overwritten or shadows transformer-kernels", "pip uninstall kernels"):
        assert words in error


def test_hub_kernels_first_on_the_path_make_transformer_say_so(tmp_path):
    """Hugging Face's ``kernels`` earlier on sys.path: our kernels never load, and ``import transformer`` names the
    clash instead of failing on a missing submodule."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("def get_kernel(name):\n    pass\n")
    done = run_python("import transformer", tmp_path, cwd=tmp_path)
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "ImportError" in message and "transformer-kernels" in message and "same import name" in message


def test_the_attention_subpackage_stays_importable_under_the_function_of_its_name():
    """``kernels.attention`` is the function; its subpackage's modules still import and resolve under it, in
    every form a user writes (``import a.b.c as m`` reads each attribute along the path)."""
    done = run_python("import kernels.attention.mods as m\nimport kernels.attention.varlen\nimport kernels\n"
                      "from kernels.attention import decode\n"
                      "print(m.document_mask is kernels.document_mask, kernels.attention.varlen.attention_varlen is "
                      "kernels.attention_varlen, decode.attention_with_kvcache is kernels.attention_with_kvcache, "
                      "callable(kernels.attention))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] * 4
