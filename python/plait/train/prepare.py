"""Text to a token file (``plait data prepare``): tokenize documents, EOS between them.

A ``.txt`` input is one document; a ``.jsonl`` input holds one document per line, its
``"text"`` field. Documents are tokenized with the model's tokenizer (transformers'
``AutoTokenizer``, backed by the ``tokenizers`` library) without special tokens, and the
tokenizer's EOS id is written after each one, so sequences that cross a document boundary
see where it is. The output dtype follows :func:`plait.train.data.token_dtype` (by suffix
or given); ids that do not fit it are refused before anything is written. The file is
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .data import token_dtype


def _documents(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        if path.suffix.lower() == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(f"{path}:{number}: not a JSON object with a 'text' field") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{number}: 'text' must be a string")
                    yield text
        else:
            yield path.read_text(encoding="utf-8")


def _tokenizer(directory):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError("plait data prepare needs transformers and tokenizers: pip install 'plait[hf]'") from None
    if not Path(directory).is_dir():
        raise ValueError(f"{directory}: not a tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: no usable tokenizer ({err})") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{directory}: the tokenizer has no EOS token to put between documents")
    return tokenizer


def prepare(tokenizer_dir, inputs: Sequence[str], output: str, data_dtype: Optional[str] = None) -> int:
    """Tokenize ``inputs`` into token file ``output``; returns the number of tokens written."""
    from tqdm import tqdm

    dtype = token_dtype(output, data_dtype)
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"input file(s) not found: {', '.join(missing)}")
    tokenizer = _tokenizer(tokenizer_dir)
    limit = np.iinfo(dtype).max
    if len(tokenizer) - 1 > limit:
        raise ValueError(f"{tokenizer_dir}: the vocabulary has {len(tokenizer)} ids, more than {dtype.name} holds; "
                         f"write a .u32 file or pass --data-dtype uint32")
    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with tmp.open("wb") as handle:
            for text in tqdm(_documents(paths), desc="tokenizing", unit="doc"):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                np.asarray(ids, dtype=dtype).tofile(handle)
                count += len(ids)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{output}: cannot write the token file ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
