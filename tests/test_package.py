"""Packaging: the repo's `tokenizers/` scripts folder never shadows Hugging Face's package."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_scripts_folder_is_not_a_package():
    assert (REPO / "tokenizers").is_dir()
    assert not (REPO / "tokenizers" / "__init__.py").exists()


def test_import_tokenizers_gives_hugging_faces_package_from_the_repo_root():
    code = "import tokenizers; print(tokenizers.__file__); print(hasattr(tokenizers, 'Tokenizer'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    path, has_tokenizer = result.stdout.split()
    assert "site-packages" in path and has_tokenizer == "True", result.stderr


def test_python_m_mmllm_and_version():
    result = subprocess.run([sys.executable, "-m", "mmllm", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("vocab", "convert", "bench", "demo"):
        assert command in result.stdout
