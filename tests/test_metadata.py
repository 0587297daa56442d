"""Package metadata: license, authors, long description (issue 10, item 14)."""

import pathlib
import re

from setuptools.config import setupcfg

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_setup_cfg_declares_apache_license_author_and_readme():
    metadata = setupcfg.read_configuration(str(ROOT / "setup.cfg"))["metadata"]
    assert metadata["license"] == "Apache-2.0"
    assert metadata["author"] == "keras_tkfac authors"
    assert metadata["long_description"] == (ROOT / "README.md").read_text()
    assert metadata["long_description_content_type"] == "text/markdown"
    assert "LICENSE" in metadata["license_files"]


def test_license_file_is_the_apache_license():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_tools_and_examples_parse_flags_with_absl():
    scripts = sorted((ROOT / "tools").glob("*.py")) + sorted(
        (ROOT / "examples").glob("*.py"))
    assert scripts
    for path in scripts:
        source = path.read_text()
        assert not re.search(r"^\s*(import|from) argparse", source, re.M), path
        if "__main__" in source:
            assert "app.run(" in source, path


def test_make_test_all_has_slow_tests_to_run():
    # `make test-all` claims to run the tests marked slow; there must be some.
    marked = [path for path in (ROOT / "tests").glob("test_*.py")
              if "@pytest.mark.slow" in path.read_text()]
    assert marked
    assert "-m \"not slow\"" in (ROOT / "Makefile").read_text()
