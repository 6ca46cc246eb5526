"""The card queries on a real PostgreSQL: dedup, updates, soft delete, listing, batches and bad input."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest
from pydantic import ValidationError

from card_mcp import cards, search
from card_mcp.errors import Conflict, DuplicateContent, InvalidArgument, NotFound
from card_mcp.models import NewCard, content_hash
from tests.helpers import tenant_transaction


def new_card(**overrides: Any) -> NewCard:
    fields: dict[str, Any] = {
        "card_type": "voice",
        "title": "Brand voice",
        "content": {"tone": "warm", "avoid": ["jargon"], "id": uuid.uuid4().hex},
        "tags": ["core"],
    }
    fields.update(overrides)
    return NewCard.model_validate(fields)


async def count_cards(pool: asyncpg.Pool, tenant: uuid.UUID) -> int:
    async with tenant_transaction(pool, tenant) as conn:
        return int(await conn.fetchval("SELECT count(*) FROM card_mcp.cards"))


async def test_content_hash_is_sha256_of_sorted_compact_json() -> None:
    import hashlib
    import json

    content = {"b": "é", "a": [1, {"z": None, "y": True}]}
    expected = hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert content_hash(content) == expected


async def test_create_then_get_returns_the_same_card(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        status, card = await cards.create_card(conn, tenant_a, new_card(title="  Voice  ", tags=["x", "y", "x"]))
    assert status == "created"
    assert card.title == "Voice"
    assert card.tags == ["x", "y"]
    assert card.version == 1
    async with tenant_transaction(app_pool, tenant_a) as conn:
        assert await cards.get_card(conn, card.id) == card


async def test_same_type_and_content_in_one_tenant_gives_one_card(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    card = new_card()
    async with tenant_transaction(app_pool, tenant_a) as conn:
        first_status, first = await cards.create_card(conn, tenant_a, card)
    async with tenant_transaction(app_pool, tenant_a) as conn:
        second_status, second = await cards.create_card(conn, tenant_a, card.model_copy(update={"title": "Other"}))
    assert (first_status, second_status) == ("created", "existing")
    assert second == first
    assert await count_cards(app_pool, tenant_a) == 1


async def test_same_content_of_another_type_is_another_card(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    card = new_card()
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, voice = await cards.create_card(conn, tenant_a, card)
        status, insight = await cards.create_card(conn, tenant_a, card.model_copy(update={"card_type": "insight"}))
    assert status == "created"
    assert voice.id != insight.id


async def test_same_content_in_two_tenants_gives_two_cards(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID, tenant_b: uuid.UUID
) -> None:
    card = new_card()
    async with tenant_transaction(app_pool, tenant_a) as conn:
        status_a, in_a = await cards.create_card(conn, tenant_a, card)
    async with tenant_transaction(app_pool, tenant_b) as conn:
        status_b, in_b = await cards.create_card(conn, tenant_b, card)
    assert (status_a, status_b) == ("created", "created")
    assert in_a.id != in_b.id


async def test_content_of_a_deleted_card_can_be_created_again(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    card = new_card()
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, first = await cards.create_card(conn, tenant_a, card)
        await cards.delete_card(conn, first.id)
        status, again = await cards.create_card(conn, tenant_a, card)
    assert status == "created"
    assert again.id != first.id


async def test_concurrent_creates_of_one_content_make_one_card(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    import anyio

    card = new_card()
    outcomes: list[tuple[str, uuid.UUID]] = []

    async def create() -> None:
        async with tenant_transaction(app_pool, tenant_a) as conn:
            status, made = await cards.create_card(conn, tenant_a, card)
            outcomes.append((status, made.id))

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(create)
    assert sorted(status for status, _ in outcomes) == ["created"] + ["existing"] * 7
    assert len({card_id for _, card_id in outcomes}) == 1
    assert await count_cards(app_pool, tenant_a) == 1


async def test_deleted_card_is_not_found_by_get_or_update_and_deleting_it_again_answers_the_first_delete(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, card = await cards.create_card(conn, tenant_a, new_card())
        deleted_at = await cards.delete_card(conn, card.id)
    assert deleted_at is not None
    async with tenant_transaction(app_pool, tenant_a) as conn:
        with pytest.raises(NotFound):
            await cards.get_card(conn, card.id)
        with pytest.raises(NotFound):
            await cards.update_card(conn, card.id, title="New")
        assert await cards.delete_card(conn, card.id) == deleted_at
        with pytest.raises(NotFound):
            await cards.delete_card(conn, uuid.uuid4())
        hits, _ = await search.search_cards(conn)
    assert card.id not in {c.id for c in hits}
    async with tenant_transaction(app_pool, tenant_a) as conn:
        kept = await conn.fetchrow("SELECT is_active, deleted_at FROM card_mcp.cards WHERE id = $1", card.id)
    assert kept is not None and kept["is_active"] is False and kept["deleted_at"] == deleted_at


async def test_update_changes_only_given_fields_and_bumps_version(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, card = await cards.create_card(conn, tenant_a, new_card(tags=["a", "b"]))
    async with tenant_transaction(app_pool, tenant_a) as conn:
        updated = await cards.update_card(conn, card.id, title="Renamed", expected_version=1)
    assert updated.title == "Renamed"
    assert updated.content == card.content and updated.tags == ["a", "b"]
    assert updated.version == 2
    assert updated.updated_at > card.updated_at
    async with tenant_transaction(app_pool, tenant_a) as conn:
        cleared = await cards.update_card(conn, card.id, tags=[])
    assert cleared.tags == [] and cleared.version == 3


async def test_update_that_changes_nothing_keeps_the_version(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, card = await cards.create_card(conn, tenant_a, new_card())
        same = await cards.update_card(conn, card.id, title=card.title, content=dict(card.content), tags=card.tags)
    assert same == card


async def test_update_with_stale_expected_version_is_a_conflict(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, card = await cards.create_card(conn, tenant_a, new_card())
        await cards.update_card(conn, card.id, title="v2")
    async with tenant_transaction(app_pool, tenant_a) as conn:
        with pytest.raises(Conflict):
            await cards.update_card(conn, card.id, title="v3", expected_version=1)
    async with tenant_transaction(app_pool, tenant_a) as conn:
        assert (await cards.get_card(conn, card.id)).title == "v2"


async def test_update_to_content_of_another_card_is_duplicate_content_naming_it(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, one = await cards.create_card(conn, tenant_a, new_card())
        _, two = await cards.create_card(conn, tenant_a, new_card())
    async with tenant_transaction(app_pool, tenant_a) as conn:
        with pytest.raises(DuplicateContent) as caught:
            await cards.update_card(conn, two.id, content=one.content)
    assert caught.value.card_id == str(one.id)


async def test_listing_pages_newest_first_with_each_card_once(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        # One transaction: every card has the same updated_at, so paging must break ties by id.
        made = [(await cards.create_card(conn, tenant_a, new_card(title=f"c{i}")))[1] for i in range(7)]
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        async with tenant_transaction(app_pool, tenant_a) as conn:
            hits, pinned = await search.search_cards(conn, limit=3, cursor=cursor)
            page = search.paginate(hits, pinned, 3)
        seen.extend(c.id for c in page.cards)
        assert len(page.cards) <= 3
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(c.id for c in made)
    assert len(seen) == len(set(seen))


async def test_listing_filters_by_type_and_all_tags(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, both = await cards.create_card(conn, tenant_a, new_card(card_type="audience", tags=["spring", "gen-z"]))
        await cards.create_card(conn, tenant_a, new_card(card_type="audience", tags=["spring"]))
        await cards.create_card(conn, tenant_a, new_card(card_type="voice", tags=["spring", "gen-z"]))
        hits, _ = await search.search_cards(conn, card_type="audience", tags=["gen-z", "spring"])
    assert [c.id for c in hits] == [both.id]


async def test_a_forged_cursor_is_an_invalid_argument(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        with pytest.raises(InvalidArgument):
            await search.search_cards(conn, cursor="not-a-cursor")


async def test_batch_insert_reports_created_and_existing_by_index(app_pool: asyncpg.Pool, tenant_a: uuid.UUID) -> None:
    stored = new_card()
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, old = await cards.create_card(conn, tenant_a, stored)
    fresh = [new_card() for _ in range(5)]
    batch = [fresh[0], stored, fresh[1], fresh[0], *fresh[2:]]
    progress: list[tuple[int, int]] = []

    async def on_progress(done: int, total: int) -> None:
        progress.append((done, total))

    async with tenant_transaction(app_pool, tenant_a) as conn:
        results = await cards.insert_cards(conn, tenant_a, batch, chunk_size=2, on_progress=on_progress)
    assert [r.status for r in results] == [
        "created",
        "existing",
        "created",
        "existing",
        "created",
        "created",
        "created",
    ]
    assert results[1].card_id == old.id
    assert results[3].card_id == results[0].card_id
    assert progress[-1] == (6, 6) and len(progress) == 3
    assert await count_cards(app_pool, tenant_a) == 6


async def test_batch_with_one_bad_card_writes_nothing_and_names_its_index(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    batch = [new_card(), new_card(content={"text": "x" * 70_000}), new_card()]
    with pytest.raises(InvalidArgument) as caught:
        async with tenant_transaction(app_pool, tenant_a) as conn:
            await cards.insert_cards(conn, tenant_a, batch)
    assert "cards[1]" in caught.value.message
    assert await count_cards(app_pool, tenant_a) == 0


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"text": "x" * (64 * 1024)}, id="over-64KiB"),
        pytest.param(nested(33), id="deeper-than-32"),
        pytest.param({"text": "nul\x00here"}, id="nul-in-value"),
        pytest.param({"k\x00": "v"}, id="nul-in-key"),
        pytest.param({"n": float("nan")}, id="nan"),
    ],
)
async def test_bad_content_is_refused_and_writes_nothing(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID, content: dict[str, Any]
) -> None:
    card = NewCard.model_construct(card_type="voice", title="t", content=content, tags=[])
    with pytest.raises(InvalidArgument):
        async with tenant_transaction(app_pool, tenant_a) as conn:
            await cards.create_card(conn, tenant_a, card)
    assert await count_cards(app_pool, tenant_a) == 0


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"title": "x" * 201}, id="title-201"),
        pytest.param({"title": "   "}, id="title-blank"),
        pytest.param({"title": "line\nbreak"}, id="title-control-char"),
        pytest.param({"tags": [f"t{i}" for i in range(21)]}, id="21-tags"),
        pytest.param({"tags": ["x" * 65]}, id="tag-65"),
        pytest.param({"card_type": "persona"}, id="unknown-type"),
        pytest.param({"content": {"deep": nested(40)}}, id="content-too-deep"),
        pytest.param({"content": ["not", "an", "object"]}, id="content-not-object"),
        pytest.param({"extra": 1}, id="unknown-field"),
    ],
)
def test_bad_card_fields_are_refused_at_the_boundary(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"card_type": "voice", "title": "ok", "content": {"a": 1}, "tags": []}
    with pytest.raises(ValidationError):
        NewCard.model_validate({**base, **fields})


def test_a_title_of_200_characters_and_20_tags_are_accepted() -> None:
    card = NewCard.model_validate(
        {
            "card_type": "voice",
            "title": "x" * 200,
            "content": {"d": nested(30)},
            "tags": [f"t{i}" for i in range(20)],
        }
    )
    assert len(card.title) == 200 and len(card.tags) == 20


async def test_a_card_is_embedded_from_its_content_in_the_order_its_keys_were_written(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    """jsonb keeps an object's keys shortest first; the text the model reads of a card (semantic.card_text) keeps
    the author's order, whichever way the card was written: created, created in a batch, updated."""
    from card_mcp.semantic import card_text

    def written(marker: str) -> dict[str, Any]:
        return {
            "summary": f"Who we write for {marker}",
            "audience_notes": {"primary": "night-shift nurses", "secondary": ["parents", "students"]},
            "do": ["short sentences"],
            "examples": [{"before": "Utilize", "after": "Use"}, {"zeta": "z", "alpha": "a"}],
            "dont": "jargon",
        }

    async def embedded_text(card_id: uuid.UUID) -> str:
        async with tenant_transaction(app_pool, tenant_a) as conn:
            row = await conn.fetchrow(
                "SELECT title, tags, content, key_order FROM card_mcp.cards WHERE id = $1", card_id
            )
        assert row is not None
        return card_text(row["title"], row["tags"], row["content"], row["key_order"])

    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, one = await cards.create_card(conn, tenant_a, new_card(content=written("one")))
        (two, three) = await cards.insert_cards(
            conn, tenant_a, [new_card(content=written("two")), new_card(content=written("three"))]
        )
        updated = await cards.update_card(conn, one.id, content=written("four"))
        retitled = await cards.update_card(conn, three.card_id, title="Renamed")  # the content's order stays
    assert list(one.content) != list(written("one"))  # as jsonb returns it: shortest key first
    assert card_text("x", [], one.content) != card_text("x", [], written("one"))
    assert await embedded_text(updated.id) == card_text(updated.title, updated.tags, written("four"))
    assert await embedded_text(two.card_id) == card_text("Brand voice", ["core"], written("two"))
    assert await embedded_text(retitled.id) == card_text("Renamed", ["core"], written("three"))
    assert (await embedded_text(updated.id)).index("Who we write for") < (await embedded_text(updated.id)).index(
        "short sentences"
    )


def test_a_cards_key_order_stays_small_whatever_its_content_nests_under_long_keys() -> None:
    """Each path repeats its parents' keys: 255 keys under one 62,000-character key would be 16 MB of paths."""
    import json

    from card_mcp.models import MAX_KEY_ORDER, MAX_KEY_ORDER_BYTES, key_order

    deep = {"K" * 62_000: {f"k{i}": i for i in range(255)}}
    wide = {f"key{i}": {"a": 1, "b": [{"c": 2}]} for i in range(1000)}
    assert key_order(deep) == []  # its one path alone is over the bound: jsonb's order, as before
    assert len(json.dumps(key_order(wide))) <= MAX_KEY_ORDER_BYTES
    assert len(key_order(wide)) == MAX_KEY_ORDER
    assert key_order(wide)[:4] == [["key0"], ["key0", "a"], ["key0", "b"], ["key0", "b", 0, "c"]]
