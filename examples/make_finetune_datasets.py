"""Write the small fine-tuning datasets bundled in `keras_gemma2/training/datasets`.

Two datasets, both written by this script (not taken from anywhere), both
sized for the 2.4M-parameter `gemma2_tiny_python` preset, which knows
Python-looking text and nothing else:

- `python_instructions_{train,held_out}.jsonl`: rows of `{"prompt", "response"}`.
  The prompt is a function header with a one-line docstring, the response is
  its one-line body, e.g. `def add(a, b):` plus the docstring
  `Return the sum of a and b.` -> `    return a + b`.
- `python_chats_{train,held_out}.jsonl`: rows of `{"messages": [...]}`, two or
  three exchanges: the user asks for a function, then for a docstring or a new
  name; each answer repeats the function with the change, so later answers
  depend on earlier turns.

Each task (docstring -> expression) appears in both splits; the held-out rows
use function and argument names that no training row of that task uses.
The output is deterministic (`random.Random(0)`); run again to reproduce the
files byte for byte:

    python examples/make_finetune_datasets.py
"""

import argparse
import itertools
import json
import os
import random

OUTPUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "keras_gemma2",
    "training",
    "datasets",
)

PAIRS = [
    ("a", "b"),
    ("x", "y"),
    ("left", "right"),
    ("first", "second"),
    ("m", "n"),
    ("value", "other"),
    ("start", "stop"),
    ("p", "q"),
]
NUMBERS = ["x", "n", "value", "number", "count", "size", "total", "amount"]
SEQUENCES = ["items", "values", "numbers", "data", "seq", "elements", "rows", "parts"]
STRINGS = ["text", "name", "line", "word", "title", "label", "message", "path"]
STRING_PAIRS = [
    ("text", "prefix"),
    ("name", "start"),
    ("line", "head"),
    ("path", "root"),
    ("word", "letters"),
    ("title", "begin"),
    ("label", "tag"),
    ("message", "opening"),
]

# (argument pool, function names, docstring, returned expression); the
# docstring and expression name the arguments {0} and {1}.
TASKS = [
    (PAIRS, ["add", "plus", "sum_of"], "Return the sum of {0} and {1}.", "{0} + {1}"),
    (PAIRS, ["subtract", "minus", "difference"], "Return {0} minus {1}.", "{0} - {1}"),
    (
        PAIRS,
        ["multiply", "times", "product"],
        "Return the product of {0} and {1}.",
        "{0} * {1}",
    ),
    (PAIRS, ["divide", "ratio", "quotient"], "Return {0} divided by {1}.", "{0} / {1}"),
    (
        PAIRS,
        ["remainder", "modulo", "mod"],
        "Return the remainder of {0} divided by {1}.",
        "{0} % {1}",
    ),
    (
        PAIRS,
        ["power", "raise_to", "pow_of"],
        "Return {0} raised to the power {1}.",
        "{0} ** {1}",
    ),
    (
        PAIRS,
        ["larger", "maximum", "biggest"],
        "Return the larger of {0} and {1}.",
        "max({0}, {1})",
    ),
    (
        PAIRS,
        ["smaller", "minimum", "least"],
        "Return the smaller of {0} and {1}.",
        "min({0}, {1})",
    ),
    (
        PAIRS,
        ["equal", "same", "is_equal"],
        "Return True if {0} equals {1}.",
        "{0} == {1}",
    ),
    (
        PAIRS,
        ["greater", "is_greater", "above"],
        "Return True if {0} is greater than {1}.",
        "{0} > {1}",
    ),
    (NUMBERS, ["double", "twice", "doubled"], "Return {0} doubled.", "{0} * 2"),
    (NUMBERS, ["square", "squared", "sq"], "Return the square of {0}.", "{0} * {0}"),
    (
        NUMBERS,
        ["absolute", "magnitude", "abs_of"],
        "Return the absolute value of {0}.",
        "abs({0})",
    ),
    (
        NUMBERS,
        ["is_even", "even", "check_even"],
        "Return True if {0} is even.",
        "{0} % 2 == 0",
    ),
    (
        NUMBERS,
        ["is_negative", "negative", "below_zero"],
        "Return True if {0} is negative.",
        "{0} < 0",
    ),
    (
        NUMBERS,
        ["increment", "next_value", "plus_one"],
        "Return {0} plus one.",
        "{0} + 1",
    ),
    (
        SEQUENCES,
        ["count", "length", "size_of"],
        "Return the number of items in {0}.",
        "len({0})",
    ),
    (
        SEQUENCES,
        ["first", "head", "first_item"],
        "Return the first item of {0}.",
        "{0}[0]",
    ),
    (
        SEQUENCES,
        ["last", "tail", "last_item"],
        "Return the last item of {0}.",
        "{0}[-1]",
    ),
    (
        SEQUENCES,
        ["sort", "ordered", "sorted_items"],
        "Return the items of {0} in sorted order.",
        "sorted({0})",
    ),
    (
        SEQUENCES,
        ["reverse", "backwards", "reversed_items"],
        "Return the items of {0} in reverse order.",
        "list(reversed({0}))",
    ),
    (
        SEQUENCES,
        ["total", "add_up", "sum_items"],
        "Return the total of the numbers in {0}.",
        "sum({0})",
    ),
    (
        SEQUENCES,
        ["largest", "top", "max_item"],
        "Return the largest item of {0}.",
        "max({0})",
    ),
    (
        SEQUENCES,
        ["is_empty", "empty", "has_nothing"],
        "Return True if {0} is empty.",
        "not {0}",
    ),
    (
        SEQUENCES,
        ["unique", "distinct", "as_set"],
        "Return a set of the items in {0}.",
        "set({0})",
    ),
    (
        STRINGS,
        ["upper", "shout", "to_upper"],
        "Return {0} in upper case.",
        "{0}.upper()",
    ),
    (
        STRINGS,
        ["lower", "quiet", "to_lower"],
        "Return {0} in lower case.",
        "{0}.lower()",
    ),
    (
        STRINGS,
        ["strip", "trim", "clean"],
        "Return {0} without surrounding whitespace.",
        "{0}.strip()",
    ),
    (
        STRINGS,
        ["words", "split_words", "tokens"],
        "Return the words of {0}.",
        "{0}.split()",
    ),
    (
        STRINGS,
        ["lines", "split_lines", "line_list"],
        "Return the lines of {0}.",
        "{0}.splitlines()",
    ),
    (
        STRING_PAIRS,
        ["starts_with", "has_prefix", "begins"],
        "Return True if {0} starts with {1}.",
        "{0}.startswith({1})",
    ),
]
TRAIN_PER_TASK = 12
HELD_OUT_PER_TASK = 2
NEW_NAMES = ["compute", "helper", "result", "solve", "answer", "work", "calc", "apply"]


def _arguments(pool_item):
    return pool_item if isinstance(pool_item, tuple) else (pool_item,)


def _header(name, arguments):
    return f"def {name}({', '.join(arguments)}):\n"


def _examples(rng):
    """`(train, held_out)` lists of `(name, arguments, docstring, expression)`."""
    train, held_out = [], []
    for pool, names, docstring, expression in TASKS:
        combos = list(itertools.product(names, pool))
        rng.shuffle(combos)
        # Held out: a function name and an argument set that no training row
        # of this task uses.
        held_names, held_pool = set(), set()
        chosen = []
        for name, item in combos:
            if name not in held_names and item not in held_pool:
                chosen.append((name, item))
                held_names.add(name)
                held_pool.add(item)
            if len(chosen) == HELD_OUT_PER_TASK:
                break
        rest = [
            combo
            for combo in combos
            if combo[0] not in held_names and combo[1] not in held_pool
        ]
        for split, picked in ((held_out, chosen), (train, rest[:TRAIN_PER_TASK])):
            for name, item in picked:
                arguments = _arguments(item)
                split.append(
                    (
                        name,
                        arguments,
                        docstring.format(*arguments),
                        expression.format(*arguments),
                    )
                )
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def instruction_row(name, arguments, docstring, expression):
    """A `{"prompt", "response"}` row: header and docstring -> body."""
    return {
        "prompt": f'{_header(name, arguments)}    """{docstring}"""\n',
        "response": f"    return {expression}\n",
    }


def chat_row(rng, name, arguments, docstring, expression):
    """A `{"messages"}` row: ask for a function, then change it once or twice."""
    description = docstring.removeprefix("Return ").removesuffix(".")
    if not description.startswith("True"):
        description = description[0].lower() + description[1:]
    header = _header(name, arguments)
    body = f"    return {expression}"
    messages = [
        {
            "role": "user",
            "content": f"Write {name}({', '.join(arguments)}) to return {description}.",
        },
        {"role": "model", "content": header + body},
    ]
    follow_ups = ["docstring", "rename"]
    rng.shuffle(follow_ups)
    docstring_line = ""
    for follow_up in follow_ups[: rng.choice([1, 2])]:
        if follow_up == "docstring":
            docstring_line = f'    """{docstring}"""\n'
            request = "Add a docstring."
        else:
            name = rng.choice([new for new in NEW_NAMES if new != name])
            header = _header(name, arguments)
            request = f"Rename it to {name}."
        messages.append({"role": "user", "content": request})
        messages.append({"role": "model", "content": header + docstring_line + body})
    return {"messages": messages}


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def write_datasets(directory=OUTPUT, seed=0):
    """Write the four JSONL files into `directory`; return their paths."""
    rng = random.Random(seed)
    train, held_out = _examples(rng)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for split, examples in (("train", train), ("held_out", held_out)):
        path = os.path.join(directory, f"python_instructions_{split}.jsonl")
        _write(path, [instruction_row(*example) for example in examples])
        paths.append(path)
    for split, examples in (("train", train), ("held_out", held_out)):
        path = os.path.join(directory, f"python_chats_{split}.jsonl")
        _write(path, [chat_row(rng, *example) for example in examples])
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=OUTPUT)
    for path in write_datasets(parser.parse_args().output):
        with open(path) as file:
            print(f"{sum(1 for _ in file):5d} rows  {os.path.normpath(path)}")
