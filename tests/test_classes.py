"""Class lists from the command line and classes files: normalised, validated, errors naming the bad value."""

from __future__ import annotations

import pytest

from ovdiff_cli.classes import ClassSpec, build_class_list, normalise, read_classes_file, split_list


def _names(specs: list[ClassSpec]) -> list[tuple[str, bool]]:
    return [(c.name, c.stuff) for c in specs]


def test_normalise():
    assert normalise("  potted   plant ") == "potted plant"
    assert normalise("potted\tplant") == "potted plant"
    assert normalise("cat") == "cat"
    assert normalise("   ") == ""


def test_names_in_user_order_normalised():
    specs = build_class_list(["  Potted   plant", "cat", "dog "])
    assert specs == [ClassSpec("Potted plant"), ClassSpec("cat"), ClassSpec("dog")]
    assert all(not c.stuff for c in specs)


def test_builtin_stuff_table_and_thing_override(tmp_path):
    # The paper's table (REFERENCE 8) decides when the user says nothing: tree, building, sea are things there.
    names = ["cat", "Sky", "sky-other", "tree", "sea", "trade name", "glass", "wall_brick"]
    assert _names(build_class_list(names)) == [
        ("cat", False),
        ("Sky", True),
        ("sky-other", False),
        ("tree", False),
        ("sea", False),
        ("trade name", True),
        ("glass", True),
        ("wall_brick", False),
    ]
    assert {c.stuff_from for c in build_class_list(names)} == {"paper"}
    # ovdiff's extended table for everyday vocabularies.
    extended = build_class_list(names, stuff_table="extended")
    assert _names(extended) == [
        ("cat", False),
        ("Sky", True),
        ("sky-other", True),
        ("tree", True),
        ("sea", True),
        ("trade name", False),
        ("glass", False),
        ("wall_brick", True),
    ]
    with pytest.raises(ValueError, match="--stuff-table 'mine'"):
        build_class_list(names, stuff_table="mine")
    path = tmp_path / "c.txt"
    path.write_text("tree\tthing\nsky\nfloor\tstuff\n")
    specs = build_class_list(classes_file=path)
    assert _names(specs) == [("tree", False), ("sky", True), ("floor", True)]
    assert [c.stuff_from for c in specs] == ["user", "paper", "user"]


def test_split_list():
    assert [normalise(i) for i in split_list("cat, dog,sky")] == ["cat", "dog", "sky"]
    assert _names(build_class_list(split_list("cat, dog ,  potted plant"))) == [
        ("cat", False),
        ("dog", False),
        ("potted plant", False),
    ]
    assert [normalise(i) for i in split_list("cat")] == ["cat"]


@pytest.mark.parametrize("value", ["cat,,dog", "cat,", ",cat", "cat, ,dog", "", "  "])
def test_split_list_empty_items(value):
    with pytest.raises(ValueError) as info:
        split_list(value)
    assert repr(value) in str(info.value)
    assert "empty item" in str(info.value)


@pytest.mark.parametrize("names", [None, []])
def test_no_classes(names):
    with pytest.raises(ValueError, match="no classes given"):
        build_class_list(names)


@pytest.mark.parametrize("raw", ["", "   ", "\t"])
def test_empty_name(raw):
    with pytest.raises(ValueError) as info:
        build_class_list(["cat", raw])
    assert repr(raw) in str(info.value) and "empty name" in str(info.value)


@pytest.mark.parametrize(
    ("first", "second", "shown"),
    [
        ("cat", "cat", "'cat'"),
        ("Potted Plant", "potted  plant", "'potted plant'"),
        ("sky", " SKY ", "'SKY'"),
    ],
)
def test_duplicates_after_case_and_space_normalisation(first, second, shown):
    with pytest.raises(ValueError) as info:
        build_class_list([first, "dog", second])
    msg = str(info.value)
    assert "twice" in msg
    assert shown in msg  # the second spelling...
    assert repr(normalise(first)) in msg  # ...and the first


@pytest.mark.parametrize("bad", ["\x00", "\n", "\x1b", "\u200b", "\x7f"])
def test_control_characters_rejected(bad):
    raw = f"ca{bad}t"
    with pytest.raises(ValueError) as info:
        build_class_list(["dog", raw])
    msg = str(info.value)
    assert repr(raw) in msg
    assert repr(bad) in msg


@pytest.mark.parametrize(
    ("names", "where"), [(["potted\tplant"], "the class list"), (split_list("cat, potted\tplant"), "--classes")]
)
def test_a_tab_inside_a_name_is_a_control_character(names, where):
    with pytest.raises(ValueError) as info:
        build_class_list(names, names_from=where)
    assert str(info.value) == (
        f"class 'potted\\tplant' in {where}: contains control character '\\t'; use plain text names"
    )


def test_whitespace_around_a_name_is_trimmed_not_refused():
    assert build_class_list(["\tcat\n", " dog "]) == [ClassSpec("cat"), ClassSpec("dog")]
    assert split_list(" cat\t,\n dog") == ["cat", "dog"]


def test_classes_file_control_character_names_the_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\tthing\n# comment\nd\x07og, stuff\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        build_class_list(classes_file=path)
    assert str(info.value).startswith(f"class 'd\\x07og' in {path} line 3: contains control character '\\x07'")


@pytest.mark.parametrize(
    ("names", "file", "message"),
    [
        (["cat"], "dog\nCat\tthing\n", "class 'Cat' is listed twice: in --classes as 'cat' and in {f} line 2"),
        (["dog"], "dog\n", "class 'dog' is listed twice: in --classes and in {f} line 1"),
        ([], "dog\n# x\nDOG\n", "class 'DOG' is listed twice: in {f} line 1 as 'dog' and in {f} line 3"),
        (["cat", "Cat"], "", "class 'Cat' is listed twice in --classes (also as 'cat')"),
    ],
)
def test_a_duplicate_names_both_places(tmp_path, names, file, message):
    path = tmp_path / "classes.txt"
    path.write_text(file, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        build_class_list(names, classes_file=path, names_from="--classes")
    assert str(info.value) == message.format(f=path)


def test_stuff_flag():
    specs = build_class_list(["cat", "Sky", "sea water"], stuff=["  sky", "Sea   Water"])
    assert _names(specs) == [("cat", False), ("Sky", True), ("sea water", True)]


def test_stuff_not_in_the_list():
    with pytest.raises(ValueError) as info:
        build_class_list(["cat", "dog"], stuff=["dog", "Grass "])
    assert "'grass'" in str(info.value)
    assert "--stuff" in str(info.value)


def test_classes_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(
        "# name <TAB or comma> stuff|thing\n"
        "\n"
        "cat\n"
        "sky\tstuff\n"
        "   \n"
        "  # an indented comment\n"
        "dog, thing\n"
        "sea  water , STUFF \n"
        "potted, plant\tthing\n"
        "road\t\n",
        encoding="utf-8",
    )
    assert read_classes_file(path) == [
        ("cat", None),
        ("sky", True),
        ("dog", False),
        ("sea  water ", True),
        ("potted, plant", False),  # a tab on the line: commas belong to the name
        ("road", None),
    ]
    specs = build_class_list(["bird"], classes_file=path, stuff=["road"])
    assert _names(specs) == [
        ("bird", False),
        ("cat", False),
        ("sky", True),
        ("dog", False),
        ("sea water", True),
        ("potted, plant", False),
        ("road", True),
    ]


def test_classes_file_crlf(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes(b"cat\r\nsky,stuff\r\n")
    assert _names(build_class_list(classes_file=path)) == [("cat", False), ("sky", True)]


@pytest.mark.parametrize(("line", "marker"), [("cat\tanimal", "'animal'"), ("sky,stuff,extra", "'extra'")])
def test_classes_file_bad_second_column(tmp_path, line, marker):
    path = tmp_path / "classes.txt"
    path.write_text(f"# header\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_classes_file(path)
    msg = str(info.value)
    assert f"{path}:2:" in msg  # file and line number
    assert marker in msg


def test_classes_file_duplicate_across_sources(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("dog\nCat\tthing\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'Cat'.*'cat'.*classes.txt line 2"):
        build_class_list(["cat"], classes_file=path)


def test_classes_file_with_only_comments(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    assert read_classes_file(path) == []
    with pytest.raises(ValueError, match="no classes given"):
        build_class_list(classes_file=path)


def test_unreadable_classes_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError) as info:
        build_class_list(classes_file=missing)
    assert str(missing) in str(info.value) and "no such file" in str(info.value)

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        read_classes_file(latin1)
    assert str(latin1) in str(info.value) and "UTF-8" in str(info.value)

    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError) as info:
        read_classes_file(folder)
    assert str(folder) in str(info.value)


def test_classes_file_with_utf8_bom(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_bytes("\ufeffcat\nsky,stuff\n".encode())
    assert build_class_list(classes_file=f) == [ClassSpec("cat"), ClassSpec("sky", True)]


def test_split_list_returns_normalised_items():
    assert split_list(" cat,  potted   plant ,sky") == ["cat", "potted plant", "sky"]
