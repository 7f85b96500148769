"""graft.data readers: every format into a Dataset, labels of any type to sorted ids, and a
one-line error naming the file, line and column for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graft.data import DataError, DataOptions, Dataset, encode_labels, read_data
from graft.data.labels import canonical_label, sorted_labels
from graft.io import GraftIOError


def test_canonical_labels_merge_number_spellings_and_keep_text():
    assert [canonical_label(v) for v in (3, 3.0, "3", " 3 ", "3.0", True, "pos")] == [
        "3",
        "3",
        "3",
        "3",
        "3",
        "true",
        "pos",
    ]
    assert canonical_label("") is None and canonical_label(float("nan")) is None
    assert canonical_label(0.5) == "0.5"


def test_ids_follow_numeric_order_for_whole_numbers_else_text_order():
    ids, names = encode_labels(["10", 9, "2"], where=["a", "b", "c"])
    assert names == ("2", "9", "10") and ids.tolist() == [2, 1, 0]
    ids, names = encode_labels(["b", "a", "10", "9"], where=list("wxyz"))
    assert names == ("10", "9", "a", "b") and ids.tolist() == [3, 2, 0, 1]
    assert sorted_labels(["-1", "1", "0"]) == ("-1", "0", "1")


def test_known_labels_map_by_name_and_unknown_label_names_the_place():
    ids, names = encode_labels(["pos", "neg"], where=["r1", "r2"], known=("neg", "pos", "mid"))
    assert ids.tolist() == [1, 0] and names == ("neg", "pos", "mid")
    with pytest.raises(DataError, match="r2: label 'huh' is not one the head knows"):
        encode_labels(["pos", "huh"], where=["r1", "r2"], known=("neg", "pos"))


def test_csv_text_pairs_quotes_and_string_labels(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,other,label\n"hello, world",x,pos\nbye,"y ""q""",neg\nhey,z,pos\n')
    d = read_data(f, DataOptions(text_pair_column="other"))
    assert d.kind == "text" and d.texts == ["hello, world", "bye", "hey"]
    assert d.pairs == ["x", 'y "q"', "z"]
    assert d.label_names == ("neg", "pos") and d.labels.tolist() == [1, 0, 1]


def test_tsv_and_jsonl_with_custom_columns(tmp_path):
    (tmp_path / "d.tsv").write_text("sentence\ty\na b\t1\nc d\t0\n")
    d = read_data(tmp_path / "d.tsv", DataOptions(text_column="sentence", label_column="y"))
    assert d.texts == ["a b", "c d"] and d.labels.tolist() == [1, 0]
    rows = [{"t": "x", "lab": 2}, {"t": "y", "lab": 10}, {"t": "z", "lab": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = read_data(tmp_path / "d.jsonl", DataOptions(text_column="t", label_column="lab"))
    assert d.label_names == ("2", "10") and d.labels.tolist() == [0, 1, 0]


def test_numeric_csv_is_read_as_features(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("f1,f2,label\n1,2,a\n3,4.5,b\n")
    d = read_data(f)
    assert d.kind == "array" and d.x.tolist() == [[1.0, 2.0], [3.0, 4.5]]
    assert d.labels.tolist() == [0, 1]


def test_npz_arrays_and_tokens(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones((3, 2, 2)), y=np.array([2, 0, 2]))
    d = read_data(tmp_path / "a.npz")
    assert d.kind == "array" and d.x.shape == (3, 2, 2) and d.labels.tolist() == [1, 0, 1]
    np.savez(tmp_path / "t.npz", input_ids=np.ones((2, 4), int), labels=np.array(["a", "b"]))
    d = read_data(tmp_path / "t.npz")
    assert d.kind == "tokens" and d.label_names == ("a", "b")


def test_image_folder_classes_in_numeric_order(tmp_path):
    from PIL import Image

    for cls, n in (("10", 1), ("2", 2)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (4, 4), color=60 * i).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "2" / "notes.txt").write_text("ignored")
    d = read_data(tmp_path / "imgs")
    assert d.kind == "image" and len(d) == 3 and d.label_names == ("2", "10")
    assert sorted(d.labels.tolist()) == [0, 0, 1]


def test_unlabelled_data_allowed_only_when_asked(tmp_path):
    f = tmp_path / "u.csv"
    f.write_text("text\none\ntwo\n")
    assert read_data(f, DataOptions(require_labels=False)).labels is None
    with pytest.raises(DataError, match="no column 'label'.*pass --label-column"):
        read_data(f)


def test_relabel_and_subset():
    d = Dataset("d", np.array([0, 1, 1]), ("a", "b"), texts=["x", "y", "z"])
    r = d.relabel(("b", "c", "a"))
    assert r.labels.tolist() == [2, 0, 0] and r.label_names == ("b", "c", "a")
    s = d.subset([2, 0])
    assert s.texts == ["z", "x"] and s.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="label 'a' is not one the head knows"):
        d.relabel(("b",))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "a.csv",
            "text,label\nhi,pos\nlo,\n",
            r"a\.csv line 3, column 'label': the label is missing or empty",
        ),
        (
            "nolabel.jsonl",
            '{"text": "a", "label": "pos"}\n{"text": "b"}\n',
            r"nolabel\.jsonl line 2, column 'label': the label is missing or empty",
        ),
        ("b.csv", "text,label\nhi,pos,extra\n", r"b\.csv line 2: 3 fields, the header has 2"),
        ("c.csv", "txt,label\nhi,pos\n", r"c\.csv has no column 'text' \(columns: txt, label\)"),
        ("d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"d\.jsonl line 2: a JSON list"),
        ("e.jsonl", '{"text": "a", "label": 1}\n{bad\n', r"e\.jsonl line 2: not a JSON object"),
        ("f.jsonl", '{"text": ' * 5000 + "1" + "}" * 5000 + "\n", r"f\.jsonl line 1"),
        ("g.csv", "text,text\na,b\n", r"g\.csv line 1: column 'text' appears twice"),
        (
            "h.jsonl",
            '{"text": {"a": 1}, "label": 1}\n',
            r"h\.jsonl line 1: column 'text' holds a dict",
        ),
        ("i.csv", "text,label\n", r"i\.csv holds no examples"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises((DataError, GraftIOError), match=match) as info:
        read_data(f)
    assert "\n" not in str(info.value)


def test_non_utf8_and_unknown_suffix(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(GraftIOError, match="is not UTF-8 text"):
        read_data(tmp_path / "a.csv")
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pass a .csv, .tsv, .jsonl or .npz file"):
        read_data(tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no such data file or folder"):
        read_data(tmp_path / "missing.csv")


def test_limit_reads_only_the_first_rows(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(50)))
    d = read_data(f, DataOptions(limit=7))
    assert len(d) == 7 and d.texts[-1] == "t6"


def test_zoo_task_spec_reads_a_digits_split():
    d = read_data("task:rot90-digit", split="val")
    assert d.kind == "array" and d.task == "rot90-digit" and len(d) == 200
    assert d.label_names == tuple(str(i) for i in range(10))
    with pytest.raises(DataError, match="unknown task 'nope'"):
        read_data("task:nope")


def test_whole_number_labels_are_the_head_outputs_when_the_head_has_no_names(tmp_path):
    """Labels {3, 7, 9} of an .npz are outputs 3, 7 and 9 of a 10-way head without label
    names (the digits zoo's heads), not 0, 1 and 2 (their sorted order)."""
    import torch

    from graft.data import load_runner
    from graft.models.digits_net import build_backbone, default_config, save_backbone, save_head

    config = default_config(hidden_size=4, intermediate_size=8, num_hidden_layers=1)
    save_backbone(build_backbone(config), config, tmp_path / "m")
    save_head(torch.nn.Linear(4, 10), tmp_path / "h.safetensors", task="t")
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 64)), y=np.array([9, 3, 7]))
    runner = load_runner(tmp_path / "m", head=tmp_path / "h.safetensors")
    data = runner.prepare(read_data(tmp_path / "d.npz"))
    assert data.labels.tolist() == [9, 3, 7] and data.label_names == tuple(map(str, range(10)))
    np.savez(tmp_path / "e.npz", x=np.zeros((1, 64)), y=np.array([12]))
    with pytest.raises(DataError, match="label 12, outside the head's 10 outputs"):
        runner.prepare(read_data(tmp_path / "e.npz"))
