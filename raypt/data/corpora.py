"""Real data that ships with the install, so demos and experiments download nothing: code corpora for text
sources (a domain each), sample images and sounds for the media ones, and a small labelled image set (digits)."""
from __future__ import annotations

import importlib.util
import io
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from raypt.schema import ConfigError

TEXT = ("stdlib", "cpp-headers", "site-python")
CPP_HEADERS = ("**/*.h", "**/*.hpp", "**/*.cuh")
# Test suites are mostly fixtures and asserts, not the code the corpus stands for.
PYTHON_SKIP = frozenset({"site-packages", "test", "tests", "idle_test"})
DIGIT_SIDE = 32  # digits' default stored side: 8 px is too small for random crops and blur to mean anything
# site-python: raypt's own dependencies of moderate size (about 32 MB of sources together, like the ~39 MB of torch's
# C/C++ headers), read in this alphabetical order. ray, torch and transformers are left out: each alone is larger
# than all of these together and would make the corpus mostly one project's code.
SITE_PACKAGES = ("deepspeed", "matplotlib", "numpy", "pyarrow", "pydantic", "scipy", "skimage")


def read_source(path: Path) -> str | None:
    """A corpus file's text; None (left out, not a bad record) when it is not UTF-8, unreadable or blank."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def tree(root: Path, patterns: tuple[str, ...], skip: frozenset[str] = frozenset()) -> list[Path]:
    """Every file under root matching a glob, in sorted path order, less those under a folder named in `skip`."""
    files = sorted({f for pattern in patterns for f in root.glob(pattern)})
    return [f for f in files if not skip.intersection(f.relative_to(root).parts)]


def read_tree(root: Path, files: list[Path], max_bytes: int) -> Iterator[tuple[str, str]]:
    """(path relative to root, text) of each readable file in order, until max_bytes characters are read: the
    same install always gives the same corpus, and names (which decide the val split) do not depend on where
    Python is installed."""
    total = 0
    for f in files:
        text = read_source(f)
        if text is None:
            continue
        yield str(f.relative_to(root)), text
        total += len(text)
        if total >= max_bytes:
            return


def package_folder(name: str, source: str) -> Path:
    """An installed package's folder, found without importing it (importing torch takes seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.prepare.source: '{source}' reads the installed {name} package, which this Python "
                          f"lacks")
    return Path(spec.submodule_search_locations[0])


def source_files(source: str) -> tuple[Path, list[Path]]:
    """The root and files of a code corpus of the install. stdlib: the Python standard library; cpp-headers: the
    C/C++ headers of the torch wheel (a strong shift from Python); site-python: the sources of SITE_PACKAGES (a weak
    one)."""
    if source == "stdlib":
        root, patterns, skip = Path(sysconfig.get_paths()["stdlib"]), ("**/*.py",), PYTHON_SKIP
    elif source == "cpp-headers":
        root, patterns, skip = package_folder("torch", source) / "include", CPP_HEADERS, frozenset()
    else:
        root, skip = Path(sysconfig.get_paths()["purelib"]), PYTHON_SKIP
        patterns = tuple(f"{package}/**/*.py" for package in SITE_PACKAGES)
    files = tree(root, patterns, skip)
    if not files:
        raise ConfigError(f"data.prepare.source: '{source}' found no {' or '.join(patterns)} file under {root}")
    return root, files


def text_documents(source: str, max_bytes: int) -> list[tuple[str, str]]:
    """The (name, text) documents of a code corpus, whole files in sorted path order up to max_bytes characters,
    as `data prepare` reads them."""
    return list(read_tree(*source_files(source), max_bytes))


def packaged_inputs(source: str) -> list[str]:
    """Real images and sounds that ship inside installed packages, so demos download nothing."""
    if source == "skimage":
        import skimage.data

        folder = os.path.dirname(skimage.data.__file__)
        return [f"{folder}/*.png", f"{folder}/*.jpg"]
    folder = os.path.join(sysconfig.get_paths()["stdlib"], "test", "audiodata")
    if not os.path.isdir(folder):
        raise ConfigError(f"data.prepare.source: 'stdlib-audio' needs Python's own test files ({folder}), which "
                          f"this Python lacks; use source 'audio' with inputs")
    return [f"{folder}/*.{ext}" for ext in ("wav", "aiff", "au")]


def digits(side: int) -> list[tuple[str, bytes, int]]:
    """scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels with 17 grey levels, classes 0-9) as
    (name, RGB PNG bytes, label), bright ink on black, upsampled bilinearly to side x side: smooth strokes, not 4x4
    blocks whose sharp edges would be high frequencies no digit has. Names are the images' places in the set."""
    from sklearn.datasets import load_digits  # here: scikit-learn takes a second to import

    bunch = load_digits()
    grey = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    out = []
    for i, (pixels, label) in enumerate(zip(grey, bunch.target)):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(buf, "PNG")
        out.append((f"digits/{i:04d}", buf.getvalue(), int(label)))
    return out
