"""``classes.txt`` of a folder dataset: one class per line, in label-id order, with the zero-shot split.

Format (UTF-8)::

    background
    cat
    pottedplant            unseen | potted plant
    tvmonitor | tv monitor
    sheep  unseen

* Line *i* (counting from 0, after leading blank lines) is the class whose id is *i* in the masks
  (plus the dataset's label offset, see ``folder.py``).  Because ids are line numbers, a blank line
  *between* classes is an error rather than silently shifting every later id; blank lines at the
  start and the end are ignored.
* A last word ``unseen`` (any case) marks a class of the zero-shot split: its pixels are ignored while
  prompts are learned and it is scored as unseen by ``training.evaluate``.  The name of a class cannot
  itself end in the word "unseen" (a class named just ``unseen`` is allowed).
* ``| prompt name`` after a class gives the name the text encoder sees (MaskCLIP's renamings,
  e.g. ``tvmonitor | tv monitor``); without it the class name is used.
* Names are trimmed and inner white space is collapsed.  Names and prompt names must be unique
  (ignoring case, as the predictor's vocabularies are) and may not contain ``,`` or ``;`` (they
  separate classes on mvpseg's command line).
"""
from __future__ import annotations

import re
from pathlib import Path

from .base import DatasetError
from .classes import ClassSplit

UNSEEN_MARK = "unseen"
MAX_CLASSES = 255  # uint8 label maps with 255 = ignore: ids 0..254
MAX_NAME_CHARS = 60  # mvpseg.predictor.MAX_NAME_CHARS: longer names are refused at inference anyway
_SEPARATORS = re.compile(r"[,;]")


def _clean(text: str) -> str:
    return " ".join(text.split())


def parse_class_lines(lines: list[str], source: str = "classes.txt") -> ClassSplit:
    """Parses the lines of a class file into a ``ClassSplit`` (names, prompt names, unseen indices).

    ``source`` names the file in error messages, which also give the 1-based line number.
    Raises ``DatasetError`` for an empty file, an inner blank line, an empty name or prompt name,
    a name with a separator, duplicates, too many classes, or every class unseen.
    """
    numbered = list(enumerate(lines, start=1))
    while numbered and not numbered[0][1].strip():  # leading / trailing blanks carry no id
        numbered.pop(0)
    while numbered and not numbered[-1][1].strip():
        numbered.pop()
    if not numbered:
        raise DatasetError(f"{source} lists no classes (one class name per line, in id order)")
    names: list[str] = []
    prompts: list[str] = []
    unseen: list[int] = []
    name_line: dict[str, int] = {}  # lower-cased name -> its line, for duplicate messages
    prompt_line: dict[str, int] = {}
    for lineno, raw in numbered:
        where = f"{source} line {lineno}"
        if not raw.strip():
            raise DatasetError(f"{where} is blank: line numbers are class ids, so remove the line or "
                               "name the unused id (e.g. 'unused')")
        left, bar, right = raw.partition("|")
        words = left.split()
        is_unseen = len(words) > 1 and words[-1].lower() == UNSEEN_MARK
        name = _clean(" ".join(words[:-1] if is_unseen else words))
        prompt = _clean(right) if bar else name
        if not name:
            raise DatasetError(f"{where} has no class name before '|': {raw.strip()!r}")
        if bar and not prompt:
            raise DatasetError(f"{where} has an empty prompt name after '|' (drop the '|' to use the class name)")
        for kind, text in (("class name", name), ("prompt name", prompt)):
            if _SEPARATORS.search(text):
                raise DatasetError(f"{where}: {kind} {text!r} contains ',' or ';' (they separate classes in "
                                   "vocabularies)")
            if len(text) > MAX_NAME_CHARS:
                raise DatasetError(f"{where}: {kind} {text[:30]!r}… is {len(text)} characters "
                                   f"(limit {MAX_NAME_CHARS})")
        # Class names index the masks and prompt names are the text tower's vocabulary: each must be unique.
        for kind, text, seen_at in (("class name", name, name_line), ("prompt name", prompt, prompt_line)):
            if text.lower() in seen_at:
                raise DatasetError(f"{where}: {kind} {text!r} is already on line {seen_at[text.lower()]} "
                                   "(names are compared ignoring case)")
            seen_at[text.lower()] = lineno
        if is_unseen:
            unseen.append(len(names))
        names.append(name)
        prompts.append(prompt)
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"{source} lists {len(names)} classes; at most {MAX_CLASSES} fit 8-bit masks "
                           "(255 is the ignore id)")
    if len(unseen) == len(names):
        raise DatasetError(f"{source} marks every class 'unseen': nothing would be left to learn prompts on")
    return ClassSplit(tuple(names), tuple(prompts), tuple(unseen))


def read_class_file(path: str | Path) -> ClassSplit:
    """Reads ``classes.txt`` (format in the module docstring); errors name the path and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class list not found: {path} (one class name per line, in id order)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM from Windows editors is not part of a name
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read class list {path}: {exc}") from exc
    return parse_class_lines(text.splitlines(), str(path))


def format_class_lines(split: ClassSplit) -> list[str]:
    """The lines of a class file for ``split`` (what ``training.toyworld export`` writes)."""
    unseen = set(split.unseen)
    out = []
    for i, (name, prompt) in enumerate(zip(split.class_names, split.prompt_names)):
        line = name + (f" {UNSEEN_MARK}" if i in unseen else "")
        out.append(line + (f" | {prompt}" if prompt != name else ""))
    return out
