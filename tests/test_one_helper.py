"""Small ideas written once: the one-line form of an exception (lvvit/errors.py), the SHA-256
of a file (lvvit/digest.py), environment variables for a block (lvvit/environ.py), and the
server harness kept out of the server package."""

from __future__ import annotations

import hashlib
import importlib.util
import os

import pytest

from lvvit.digest import file_sha256
from lvvit.environ import scoped_environ
from lvvit.errors import first_line


def test_an_error_reads_as_its_type_and_first_line_within_the_limit():
    err = RuntimeError("  first line " + "x" * 400 + "\n  paragraphs of advice\n")
    assert first_line(err) == "RuntimeError: first line " + "x" * 289
    assert first_line(err, 20) == "RuntimeError: first line xxxxxxxxx"
    assert first_line(OSError("a\nb"), None) == "OSError: a"
    assert first_line(KeyError()) == "KeyError"


def test_the_file_digest_is_the_sha256_of_its_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # over one read block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_the_server_harness_is_not_part_of_the_server():
    assert importlib.util.find_spec("lvvit.serving.process") is None
    assert importlib.util.find_spec("lvvit.bench.server_process") is not None


def test_scoped_environ_sets_and_unsets_then_restores_even_on_an_error(monkeypatch):
    monkeypatch.setenv("LVVIT_T_KEPT", "before")
    monkeypatch.delenv("LVVIT_T_NEW", raising=False)
    with pytest.raises(RuntimeError), scoped_environ({"LVVIT_T_KEPT": None, "LVVIT_T_NEW": "x"}):
        assert "LVVIT_T_KEPT" not in os.environ and os.environ["LVVIT_T_NEW"] == "x"
        raise RuntimeError
    assert os.environ["LVVIT_T_KEPT"] == "before" and "LVVIT_T_NEW" not in os.environ
