"""``--allow-download`` on generate / score / config: the same as ``EFT_JAX_ALLOW_DOWNLOAD=1`` (``loading.hub``)."""

from __future__ import annotations

import pytest

from eft_jax import cli
from job_helpers import trio_config


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may leave this machine: a download attempt fails at once
    monkeypatch.delenv("EFT_JAX_ALLOW_DOWNLOAD", raising=False)  # restored after the test, whatever the CLI sets


def test_allow_download_reaches_the_hub_lookup(family, tmp_path, offline, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def snapshot_download(repo, *, local_files_only, **kwargs):  # records what eft-jax asked huggingface_hub for
        asked.append((repo, local_files_only))
        raise LocalEntryNotFoundError("not in this test's cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = trio_config(family, tmp_path / "c.yaml")
    args = ["--config", str(config), "models.small_ft.path=some-org/absent-model"]
    assert cli.main(["config", *args]) == 0
    assert "not found here: models.small_ft.path: some-org/absent-model" in capsys.readouterr().out
    assert cli.main(["config", "--allow-download", *args]) == 0
    assert "not found here: models.small_ft.path: some-org/absent-model" in capsys.readouterr().out
    assert asked == [("some-org/absent-model", True), ("some-org/absent-model", False)]


@pytest.mark.parametrize("command", ["generate", "score", "config"])
def test_every_job_command_takes_the_flag(command):
    assert cli.build_parser().parse_args([command, "--allow-download"]).allow_download
    assert not cli.build_parser().parse_args([command]).allow_download
