"""The embedded interpreter's sys.path: the venv only (see feedrank.embedded_sys_path)."""

from __future__ import annotations

from pathlib import Path

from core import embedded_sys_path, is_embedded


def test_base_site_packages_leave_the_path_of_an_embedded_interpreter_only(tmp_path: Path):
    venv_site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    venv_site.mkdir(parents=True)
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /base/bin\n")
    base_site = "/base/lib/python3.11/site-packages"
    path = [str(venv_site), "/project", "/base/lib/python311.zip", "/base/lib/python3.11", base_site]
    # the base Python with the venv on PYTHONPATH (PyFlink thread mode): the base's packages go
    assert embedded_sys_path(path, "/base", "/base", [base_site]) == path[:-1]
    # the venv's own interpreter, or a plain install without a venv: untouched
    assert embedded_sys_path(path, str(tmp_path / "venv"), "/base", [base_site]) == path
    plain = ["/project", "/base/lib/python3.11", base_site]
    assert embedded_sys_path(plain, "/base", "/base", [base_site]) == plain
    assert is_embedded(path, "/base", "/base") and not is_embedded(path, str(tmp_path / "venv"), "/base")
    assert not is_embedded(plain, "/base", "/base")
