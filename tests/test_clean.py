"""Cleaning wikitext into prose: every construct of the issue, the real gensim excerpt, and the guard."""

from __future__ import annotations

import re

import pytest

from storage.location import Location
from tasks.clean import CleanOptions, clean_article, clean_wikitext, is_disambiguation
from tasks.cleaner import GuardedCleaner
from tasks.parse import iter_pages

ARTICLE = """{{Short description|A test article}}
{{Infobox city
| name = Testville
| population = {{formatnum:12345}}
}}
__NOTOC__
'''Testville''' is a [[town]] in [[Examplestan|the Republic of Examplestan]].<ref name="a">{{cite|Secret ref}}</ref>
It was founded in 1850.<ref>Another hidden citation</ref><ref name="a"/>
Its mayor is [[Jane Doe]].<!-- hidden comment -->
[[File:Testville.jpg|thumb|The [[town hall]] caption text]]
[[Image:Other.png|left|Image caption words]]
The river is named after &amp; the [[Media:Sound.ogg|sound clip]] nothing.
See [https://example.org the official site] and https://bare.example.org too.
{| class="wikitable"
! Header cell
|-
| table cell text || {{flag|X}}
|}
<gallery>
Pic.jpg|Gallery caption
</gallery>
The formula <math>E = mc^2</math> is famous. <timeline>ImageSize = width:100</timeline>
Line one<br/>line two.

== History ==
Early ''settlers'' came by [[boat]].

=== Founding ===
Founders built a [[mill]].

== See also ==
* [[Other town]]

== References ==
{{reflist}}

== External links ==
* [http://example.com Official website]

[[Category:Towns in Examplestan]]
[[de:Testville]]
[[fr:Testville (ville)]]
"""


@pytest.fixture(scope="module")
def sections():
    return clean_wikitext(ARTICLE, CleanOptions())


def test_prose_and_link_text_are_kept(sections):
    text = "\n".join(body for _, body in sections)
    for kept in ("Testville is a town in the Republic of Examplestan.", "It was founded in 1850.",
                 "Its mayor is Jane Doe.", "the official site", "The formula is famous.",
                 "Early settlers came by boat.", "Founders built a mill.", "named after & the"):
        assert kept in text, kept
    assert re.search(r"Line one\s+line two\.", text)


@pytest.mark.parametrize("gone", [
    "Short description", "Infobox", "12345", "NOTOC", "Secret ref", "hidden citation", "hidden comment",
    "caption text", "Image caption", "Testville.jpg", "sound clip", "bare.example.org", "Header cell",
    "table cell", "Gallery caption", "mc^2", "ImageSize", "Other town", "reflist", "Official website",
    "Category", "Towns in", "de:", "(ville)", "'''", "''", "[[", "]]", "{{", "}}", "<ref", "{|", "|}",
    "==",
])
def test_non_prose_is_removed(sections, gone):
    text = "\n".join(body for _, body in sections)
    assert gone not in text


def test_headings_are_not_text_and_trailing_sections_dropped(sections):
    assert [h for h, _ in sections] == ["", "history", "founding"]
    assert all("History" not in body for _, body in sections)


def test_drop_list_is_configurable_per_language():
    wikitext = "Einleitung Text.\n== Geschichte ==\nAlt.\n== Weblinks ==\n* [http://x Seite]\n" \
               "== Einzelnachweise ==\n<references />\n[[Datei:Bild.jpg|mini|Bildtext]]\n[[Kategorie:Ort]]"
    german = clean_article(wikitext, CleanOptions.for_wiki("dewiki"))
    assert german == "Einleitung Text.\n\nAlt."
    english = clean_article(wikitext, CleanOptions.for_wiki("enwiki"))
    assert "Seite" in english and "Bildtext" in english  # English rules do not know Weblinks / Datei
    custom = CleanOptions.for_wiki("enwiki", drop_sections=frozenset({"geschichte"}))
    assert "Alt." not in clean_article(wikitext, custom)


def test_disambiguation_detection():
    opts = CleanOptions()
    assert is_disambiguation("Mercury (disambiguation)", "x", opts)
    assert is_disambiguation("Mercury", "'''Mercury''' may refer to:\n{{disambiguation|geo}}", opts)
    assert is_disambiguation("Aa", "{{Geodis}}", opts)
    assert not is_disambiguation("Mercury", "{{Infobox planet}} Mercury is a planet.", opts)


def test_unbalanced_markup_does_not_swallow_the_article():
    text = clean_article("Start {{unclosed template\n\nThe rest is prose.\n{| never closed table\n", CleanOptions())
    assert "Start" in text


def test_gensim_excerpt_cleans_to_plain_prose(gensim_excerpt):
    opts = CleanOptions()
    cleaned = {}
    for page in iter_pages(Location(gensim_excerpt)):
        if page.ns == 0 and not page.redirect and not is_disambiguation(page.title, page.text, opts):
            cleaned[page.title] = clean_wikitext(page.text, opts)
            if len(cleaned) == 12:
                break
    assert list(cleaned)[:3] == ["Anarchism", "Autism", "Albedo"]
    anarchism = "\n".join(body for _, body in cleaned["Anarchism"])
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert "references" not in [h for h, _ in cleaned["Anarchism"]]
    markup = re.compile(r"\[\[|\]\]|\{\{|\}\}|<ref|</ref|\{\||\|\}|'''|&nbsp;|<!--")
    for title, sections in cleaned.items():
        assert sections, title
        for _, body in sections:
            assert not markup.search(body), (title, markup.search(body).group(0))


def test_guard_skips_huge_and_slow_pages_and_goes_on():
    cleaner = GuardedCleaner(CleanOptions(max_page_chars=5_000, page_timeout_s=0.05))
    try:
        assert cleaner.clean("x" * 5_001) == (None, "too_large")
        slow = "<b>x</b> " * 50_000  # 450 kB of tags: seconds of mwparserfromhell node building
        cleaner.options = CleanOptions(max_page_chars=10**7, page_timeout_s=0.05)
        cleaner.close()
        assert cleaner.clean(slow) == (None, "timeout")
        assert cleaner.clean("'''Fine''' [[page]].") == ("Fine page.", None)  # restarted, runs on
    finally:
        cleaner.close()
