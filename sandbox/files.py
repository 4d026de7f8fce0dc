"""Deterministic, streamed export files shaped like APSIS One's single profile export."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

#: Target size of each yielded chunk, in bytes.
CHUNK_BYTES = 64 * 1024

#: Seconds between consecutive generated events (about 2.3 years per million events).
EVENT_STEP_SECONDS = 73

#: First event time, in Unix seconds (2019-01-01T00:00:00Z).
EVENT_EPOCH = 1_546_300_800

_SEPARATORS = (",", ":")
_PAD_MARKER = "\x00pad\x00"

#: Plausible people; several are non-ASCII so consumers must handle UTF-8.
_PEOPLE = [
    ("Zoë", "Ångström"),
    ("Björk", "Guðmundsdóttir"),
    ("José", "Núñez"),
    ("Łukasz", "Żółć"),
    ("Søren", "Kierkegård"),
    ("Anna", "Svensson"),
    ("Mika", "Häkkinen"),
    ("Chloé", "Lefèvre"),
]

_ATTRIBUTES = [
    ("com.apsis1.attributes.email", "Email"),
    ("com.apsis1.attributes.firstname", "First name"),
    ("com.apsis1.attributes.lastname", "Last name"),
    ("com.apsis1.attributes.phone", "Phone"),
    ("usercreated.attributes.favourite_store-{suffix}", "Favourite store"),
]

_EVENT_KINDS = [
    ("com.apsis1.events.transaction.custom-my-transaction-{suffix}", "My transaction"),
    ("com.apsis1.events.web.page-view-{suffix}", "Page view"),
    ("com.apsis1.events.email.opened-{suffix}", "Email opened"),
]

_STORES = ["Göteborg Centrum", "Malmö Triangeln", "København Strøget", "Oslo Aker Brygge"]


def merged_keys(export_key: str, seed: int, count: int) -> list[str]:
    """Keys of the profiles merged with `export_key` (the seed is kept for a future shuffle)."""
    del seed  # The merged keys only need to be stable per export key.
    return [f"{export_key}~merged-{index}" for index in range(1, count + 1)]


def _suffix(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10))


def _iso(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _email(export_key: str) -> str:
    local = re.sub(r"[^a-z0-9]+", ".", export_key.lower()).strip(".") or "profile"
    return f"{local}@example.com"


class _Schema:
    """The account's sections, attributes and events: one per seed, shared by all profiles."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"schema:{seed}")
        section_count = rng.choice([2, 3])
        self.sections = [
            f"usercreated.sections.my_section_{index}-{_suffix(rng)}"
            for index in range(section_count)
        ]
        attributes = [(disc.format(suffix=_suffix(rng)), name) for disc, name in _ATTRIBUTES]
        events = [(disc.format(suffix=_suffix(rng)), name) for disc, name in _EVENT_KINDS]
        # Spread attributes and events across sections; the last section gets the
        # transaction events, which carry the padding.
        self.attributes: dict[str, list[tuple[str, str]]] = {s: [] for s in self.sections}
        for index, attribute in enumerate(attributes):
            self.attributes[self.sections[min(index // 2, section_count - 1)]].append(attribute)
        self.events: dict[str, list[tuple[str, str]]] = {s: [] for s in self.sections}
        for index, event in enumerate(reversed(events)):
            self.events[self.sections[index % section_count]].append(event)

    def metadata(self) -> dict[str, Any]:
        def definition(disc: str, name: str) -> dict[str, Any]:
            return {
                "discriminator": disc,
                "name": name,
                "versions": [{"id": 1, "deprecated_at": None}],
            }

        return {
            "sections": {
                section: {
                    "attributes": {d: definition(d, n) for d, n in self.attributes[section]},
                    "events": {d: definition(d, n) for d, n in self.events[section]},
                }
                for section in self.sections
            }
        }


def _attribute_value(disc: str, export_key: str, rng: random.Random) -> Any:
    first, last = _PEOPLE[rng.randrange(len(_PEOPLE))]
    if disc.endswith(".email"):
        return _email(export_key)
    if disc.endswith(".firstname"):
        return first
    if disc.endswith(".lastname"):
        return last
    if disc.endswith(".phone"):
        return f"+46 70 {rng.randrange(100, 999)} {rng.randrange(10, 99)} {rng.randrange(10, 99)}"
    return rng.choice(_STORES)


def _event_data(disc: str, index: int) -> dict[str, Any]:
    if "transaction" in disc:
        return {
            "order_id": f"order-{index:08d}",
            "amount": round(10 + (index * 7919 % 99_000) / 100, 2),
            "currency": "SEK",
            "note": "Café crème ☕",
        }
    if "page-view" in disc:
        return {"url": f"https://shop.example.com/p/{index % 997}", "title": "Smörgåsbord"}
    return {"campaign": f"newsletter-{index % 53}", "subject": "Välkommen tillbaka!"}


def _profile(
    schema: _Schema, export_key: str, seed: int, *, history: bool, base_events: int
) -> dict[str, Any]:
    rng = random.Random(f"profile:{seed}:{export_key}")
    sections: dict[str, Any] = {}
    index = 0
    for section in schema.sections:
        attributes: dict[str, Any] = {}
        for disc, _name in schema.attributes[section]:
            value = _attribute_value(disc, export_key, rng)
            attribute: dict[str, Any] = {"value": value}
            if history:
                older = _attribute_value(disc, f"old.{export_key}", rng)
                start = EVENT_EPOCH - rng.randrange(10_000_000, 50_000_000)
                attribute["history"] = [
                    {"value": older, "changed_at": _iso(start)},
                    {"value": value, "changed_at": _iso(start + rng.randrange(1, 9_000_000))},
                ]
            attributes[disc] = attribute
        events: list[Any] = []
        for _ in range(base_events):
            kinds = schema.events[section]
            disc = kinds[index % len(kinds)][0]
            events.append(
                {
                    "discriminator": disc,
                    "event_time": _iso(EVENT_EPOCH + index * EVENT_STEP_SECONDS),
                    "data": _event_data(disc, index),
                }
            )
            index += 1
        sections[section] = {"attributes": attributes, "events": events}
    return {"sections": sections}


class _EventTemplates:
    """Pre-rendered event bytes with holes for time and counters, so padding is cheap."""

    def __init__(self, discs: list[str]) -> None:
        self.templates: list[tuple[str, bytes]] = []
        for disc in discs:
            data = {
                key: ("\x01" if key in ("order_id", "url", "campaign") else value)
                for key, value in _event_data(disc, 0).items()
            }
            if "amount" in data:
                data["amount"] = "\x02"
            rendered = json.dumps(
                {"discriminator": disc, "event_time": "\x03", "data": data},
                ensure_ascii=False,
                separators=_SEPARATORS,
            )
            # Turn the placeholder strings into %-format holes (bytes formatting is fast).
            rendered = rendered.replace("%", "%%").replace('"\\u0002"', "%d.%02d")
            rendered = rendered.replace("\\u0001", "%s").replace("\\u0003", "%s")
            kind = "order" if "amount" in data else "page" if "url" in data else "campaign"
            self.templates.append((kind, rendered.encode("utf-8")))
        self.max_len = max(len(template) for _, template in self.templates) + 64
        self._day = -1
        self._date = b""

    def _event_time(self, index: int) -> bytes:
        # strftime per event halves the throughput: format the date once per day.
        unix = EVENT_EPOCH + index * EVENT_STEP_SECONDS
        day, second = divmod(unix, 86_400)
        if day != self._day:
            self._day = day
            self._date = datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d").encode()
        hour, rest = divmod(second, 3600)
        return b"%sT%02d:%02d:%02dZ" % (self._date, hour, rest // 60, rest % 60)

    def render(self, index: int) -> bytes:
        kind, template = self.templates[index % len(self.templates)]
        when = self._event_time(index)
        if kind == "order":
            cents = 1000 + index * 7919 % 99_000
            return template % (when, b"order-%08d" % index, cents // 100, cents % 100)
        if kind == "page":
            return template % (when, b"https://shop.example.com/p/%d" % (index % 997))
        return template % (when, b"newsletter-%d" % (index % 53))


def _render_events(templates: _EventTemplates, start: int, budget: int) -> Iterator[bytes]:
    """Yield `,event` parts starting at `start` while they fit in `budget` bytes."""
    index = start
    while budget > templates.max_len:
        part = b"," + templates.render(index)
        budget -= len(part)
        index += 1
        yield part
    if budget > 0:
        # Whitespace is valid JSON between array elements: it makes the size exact.
        yield b" " * budget


def generate_export(
    export_key: str,
    *,
    seed: int,
    size: int,
    history: bool,
    definitions: bool,
    merged: bool,
    merged_count: int,
) -> Iterator[bytes]:
    """Yield the export file for `export_key` in ~64 KiB chunks; `size` bytes when reachable.

    The same arguments always yield the same bytes. Padding events go at the end of the
    requested profile's last section, so memory stays flat whatever the size.
    """
    schema = _Schema(seed)
    main = _profile(schema, export_key, seed, history=history, base_events=1)
    last_events = main["sections"][schema.sections[-1]]["events"]
    main["sections"][schema.sections[-1]]["events"] = _PAD_MARKER
    profiles: dict[str, Any] = {export_key: main}
    if merged:
        for key in merged_keys(export_key, seed, merged_count):
            profiles[key] = _profile(schema, key, seed, history=history, base_events=1)
    document: dict[str, Any] = {"profiles": profiles}
    if definitions:
        document["metadata"] = schema.metadata()
    text = json.dumps(document, ensure_ascii=False, separators=_SEPARATORS)
    head, tail = text.split(json.dumps(_PAD_MARKER), 1)
    first_events = json.dumps(last_events, ensure_ascii=False, separators=_SEPARATORS)
    prefix = (head + first_events[:-1]).encode("utf-8")
    suffix = ("]" + tail).encode("utf-8")

    templates = _EventTemplates([disc for disc, _ in schema.events[schema.sections[-1]]])
    budget = size - len(prefix) - len(suffix)
    buffer = [prefix]
    buffered = len(prefix)
    for part in _render_events(templates, len(schema.sections), budget):
        buffer.append(part)
        buffered += len(part)
        if buffered >= CHUNK_BYTES:
            yield b"".join(buffer)
            buffer.clear()
            buffered = 0
    buffer.append(suffix)
    yield b"".join(buffer)


def digest_export(chunks: Iterator[bytes]) -> tuple[str, int]:
    """Return (sha256 hex, byte count) of a streamed file without holding it."""
    sha = hashlib.sha256()
    total = 0
    for chunk in chunks:
        sha.update(chunk)
        total += len(chunk)
    return sha.hexdigest(), total
