"""A domain's evaluation sets: the test set and its named extra test sets, the dev set made
disjoint from them, and the check that no dev prompt equals or overlaps a test prompt.

Dev sets score merge candidates, so a dev set that contains test items picks the merge on the
test set. GPQA's main set holds every Diamond question and LiveCodeBench's release_v4 lies inside
release_v5: such dev sources set `exclude_test: true` (records whose id or prompt text is in a
test set are dropped before the limit) or a filter outside the test window. `check_dev_test`
then verifies it for every domain: the same prompt (case and spacing aside), or a dev prompt
sharing at least half of its token n-grams (`verify.decontam_ngram`, the ContaminationIndex
tokens) with one test prompt (an edited copy). Template n-grams that recur in several prompts
(LiveCodeBench's format instructions, AtCoder's input boilerplate) are left out: one shared
boilerplate n-gram says nothing about two problems being one.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

from rdistill.config import ConfigError, ExperimentConfig, SourceConfig
from rdistill.config.models import DomainConfig
from rdistill.prompts.sources import check_expected, load_records
from rdistill.prompts.text import words as split_words

TEMPLATE_MIN_PROMPTS = 3  # an n-gram in this many prompts is template text, not content
OVERLAP_SHARE = 0.5  # share of the shorter prompt's content n-grams that makes two prompts one


def domain_test_sets(dom: DomainConfig, domain: str) -> list[tuple[str, SourceConfig]]:
    """(name, source) of each test set of a domain: (domain, test) first, then
    (`<domain>/<name>`, source) for each extra test set, e.g. ("math/aime25", ...)."""
    out = [(domain, dom.test)] if dom.test is not None else []
    return out + [(f"{domain}/{s.name}", s) for s in dom.extra_test]


def source_key(domain: str, split: str, dom: DomainConfig, src: SourceConfig) -> str:
    """The config key of a source, for messages (domains.math.extra_test[0] ...)."""
    if split == "test" and src is not dom.test:
        return f"domains.{domain}.extra_test[{[id(s) for s in dom.extra_test].index(id(src))}]"
    return f"domains.{domain}.{split}"


def norm(text: Optional[str]) -> str:
    return " ".join((text or "").lower().split())


def test_keys(cfg: ExperimentConfig, domain: str, resolve: Callable[[str], str]) -> tuple[set, set]:
    """(ids, normalized prompts) of a domain's test sets."""
    ids, prompts = set(), set()
    dom = cfg.domains[domain]
    for _, src in domain_test_sets(dom, domain):
        for r in load_records(src, domain, resolve, key=source_key(domain, "test", dom, src), with_tests=False):
            ids.add(r["id"])
            prompts.add(norm(r["prompt"]))
    return ids, prompts


def split_records(cfg: ExperimentConfig, domain: str, split: str, resolve: Callable[[str], str],
                  source: Optional[SourceConfig] = None, with_tests: bool = True,
                  tests_store: Optional[Path] = None, check_size: bool = True) -> list[dict]:
    """A dev or test source's records (`source`: one of the domain's test sets; default the
    split's own source), dev sources with `exclude_test` minus the test sets' records, checked
    against `expected_rows`."""
    dom = cfg.domains[domain]
    src = source or getattr(dom, split)
    if src is None:
        raise ConfigError(f"domains.{domain}.{split} is not set: give the domain a {split} split "
                          f"(e.g. domains.{domain}.{split}.path=...)")
    key = source_key(domain, split, dom, src)
    exclude = None
    if split == "dev" and src.exclude_test:
        ids, prompts = test_keys(cfg, domain, resolve)
        exclude = lambda r: r["id"] in ids or norm(r["prompt"]) in prompts  # noqa: E731
    recs = load_records(src, domain, resolve, key=key, with_tests=with_tests, tests_store=tests_store,
                        exclude=exclude)
    if check_size:
        check_expected(src, len(recs), key)
    return recs


def _grams(text: str, n: int) -> list[str]:
    words = split_words(text)
    k = min(n, len(words))
    return [" ".join(words[i:i + k]) for i in range(len(words) - k + 1)] if k else []


def find_overlap(dev: list[dict], test: list[dict], n: int) -> Optional[tuple[dict, dict, str]]:
    """The first (dev record, test record, why) where a dev prompt equals a test prompt or shares
    OVERLAP_SHARE of its content n-grams with it; None when the sets are disjoint."""
    exact = {norm(t["prompt"]): t for t in test if t.get("prompt")}
    dev_grams = [set(_grams(d.get("prompt") or "", n)) for d in dev]
    test_grams = [set(_grams(t.get("prompt") or "", n)) for t in test]
    freq = Counter(g for gs in dev_grams + test_grams for g in gs)
    template = {g for g, c in freq.items() if c >= TEMPLATE_MIN_PROMPTS}
    owners: dict[str, list[int]] = defaultdict(list)
    for j, gs in enumerate(test_grams):
        for g in gs - template:
            owners[g].append(j)
    for d, gs in zip(dev, dev_grams):
        if d.get("prompt") and norm(d["prompt"]) in exact:
            return d, exact[norm(d["prompt"])], "the same prompt"
        content = gs - template
        hits = Counter(j for g in content for j in owners.get(g, ()))
        for j, k in hits.most_common(1):
            share = k / max(1, min(len(content), len(test_grams[j] - template)))
            if share >= OVERLAP_SHARE:
                shared = sorted(content & test_grams[j])[0]
                return d, test[j], f"{share:.0%} of their {n}-grams shared, e.g. {shared!r}"
    return None


def check_dev_test(cfg: ExperimentConfig, resolve: Callable[[str], str],
                   skip: Callable[[SourceConfig], bool] = lambda s: False) -> dict[str, dict]:
    """Every domain's dev set against every test set of the run; raises ConfigError naming the
    first overlap. Also checks each set's expected_rows. Returns {domain: {set: records}}."""
    n = cfg.verify.decontam_ngram
    tests: dict[str, list[dict]] = {}
    counts: dict[str, dict] = {}
    for domain, dom in sorted(cfg.domains.items()):
        for name, src in domain_test_sets(dom, domain):
            if not skip(src):
                tests[name] = split_records(cfg, domain, "test", resolve, source=src, with_tests=False)
                counts.setdefault(domain, {})[name] = len(tests[name])
    for domain, dom in sorted(cfg.domains.items()):
        if dom.dev is None or skip(dom.dev):
            continue
        dev = split_records(cfg, domain, "dev", resolve, with_tests=False)
        counts.setdefault(domain, {})[f"{domain} dev"] = len(dev)
        for name, recs in sorted(tests.items()):
            hit = find_overlap(dev, recs, n)
            if hit:
                d, t, what = hit
                raise ConfigError(f"domains.{domain}.dev prompt {d['id']!r} overlaps test set {name} prompt "
                                  f"{t['id']!r} ({what}): make dev disjoint from test (dev.exclude_test=true, "
                                  "or a dev filter outside the test window)")
    return counts
