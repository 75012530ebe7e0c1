"""Built-in seq2seq tasks whose data the package generates deterministically.

`dates`: a date written in one of many formats and five languages -> ISO 8601, e.g.
    "Donnerstag, 5. März 1998" -> "1998-03-05"     "the 5th of march, 1998" -> "1998-03-05"
Correctness is visible at a glance. The held-out split holds dates (not just strings) that training never sees:
every date whose ordinal is divisible by 10.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass

MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre", "décembre"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober", "November", "Dezember"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre"],
    "it": ["gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto", "settembre", "ottobre", "novembre", "dicembre"],
}
WEEKDAYS = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    "it": ["lunedì", "martedì", "mercoledì", "giovedì", "venerdì", "sabato", "domenica"],
}
FIRST_YEAR, LAST_YEAR = 1950, 2049


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _formats() -> list[Callable[[dt.date], str]]:
    def m(lang: str, d: dt.date) -> str:
        return MONTHS[lang][d.month - 1]

    def w(lang: str, d: dt.date) -> str:
        return WEEKDAYS[lang][d.weekday()]

    return [
        lambda d: f"{m('en', d)} {d.day}, {d.year}",
        lambda d: f"{d.day} {m('en', d)} {d.year}",
        lambda d: f"{m('en', d)[:3]} {d.day}, {d.year}",
        lambda d: f"{d.day} {m('en', d)[:3]} {d.year}",
        lambda d: f"{w('en', d)}, {m('en', d)} {d.day}, {d.year}",
        lambda d: f"the {_ordinal(d.day)} of {m('en', d).lower()}, {d.year}",
        lambda d: f"{m('en', d).upper()} {d.day} {d.year}",
        lambda d: f"{d.day} {m('fr', d)} {d.year}",
        lambda d: f"le {d.day} {m('fr', d)} {d.year}",
        lambda d: f"{w('fr', d)} {d.day} {m('fr', d)} {d.year}",
        lambda d: f"{d.day}. {m('de', d)} {d.year}",
        lambda d: f"{w('de', d)}, {d.day}. {m('de', d)} {d.year}",
        lambda d: f"{d.day} de {m('es', d)} de {d.year}",
        lambda d: f"{w('es', d)}, {d.day} de {m('es', d)} de {d.year}",
        lambda d: f"{d.day} {m('it', d)} {d.year}",
        lambda d: f"{w('it', d)} {d.day} {m('it', d)} {d.year}",
        lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
        lambda d: f"{d.day}.{d.month}.{d.year}",
        lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
        lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
        lambda d: d.isoformat(),
    ]


FORMATS = _formats()


def is_held_out(d: dt.date) -> bool:
    return d.toordinal() % 10 == 0


@dataclass(frozen=True)
class DatesTask:
    name: str = "dates"
    metric: str = "exact_match"  # one right answer per input (model/metrics.py)

    def sample(self, rng: random.Random, split: str) -> tuple[str, str]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        first = dt.date(FIRST_YEAR, 1, 1).toordinal()
        last = dt.date(LAST_YEAR, 12, 31).toordinal()
        while True:
            d = dt.date.fromordinal(rng.randint(first, last))
            if is_held_out(d) == (split == "test"):
                return rng.choice(FORMATS)(d), d.isoformat()

    def pairs(self, n: int, split: str, seed: int = 0) -> list[tuple[str, str]]:
        """n (source, target) pairs of a split; the same seed always gives the same pairs."""
        rng = random.Random(f"{self.name}-{split}-{seed}")
        return [self.sample(rng, split) for _ in range(n)]

    def alphabet(self) -> tuple[str, str]:
        """Every character a source or a target can hold, so that the vocabulary never depends on sampling."""
        first, last = dt.date(FIRST_YEAR, 1, 1), dt.date(LAST_YEAR, 12, 31)
        probes = [dt.date(y, mo, dd) for y in (first.year, last.year) for mo in range(1, 13) for dd in (1, 12, 23)]
        probes += [first + dt.timedelta(days=i) for i in range(7)]
        sources = {f(d) for f in FORMATS for d in probes} | {"0123456789"}
        return "".join(sorted(set("".join(sources)))), "-0123456789"


TASKS = {"dates": DatesTask()}


def get_task(name: str) -> DatesTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None
