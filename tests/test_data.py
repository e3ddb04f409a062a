"""The standard-library text every measurement reads: which files, in which split, in which order."""

from mla_dsa.data import stdlib_files


def test_stdlib_files_split_the_library_and_leave_out_tests_and_site_packages(tmp_path):
    library = ["json/__init__.py", "json/decoder.py", "os.py", "a-b/c.py", "a/b.py", "idlelib/editor.py"]
    library += [f"pkg/module_{i}.py" for i in range(60)]
    left_out = ["site-packages/torch/__init__.py", "test/test_os.py", "idlelib/idle_test/test_editor.py",
                "lib2to3/tests/test_main.py", "json/README.txt"]  # fmt: skip
    for relative in library + left_out:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x = 1\n")
    train, held_out = stdlib_files("train", tmp_path), stdlib_files("held_out", tmp_path)
    assert train and held_out and not set(train) & set(held_out)
    assert sorted(str(path.relative_to(tmp_path)) for path in train + held_out) == sorted(library)
    assert train == sorted(train) and held_out == sorted(held_out)  # pathlib's order: "a/b.py" before "a-b/c.py"
    assert stdlib_files("train", tmp_path) == train  # the same split every time
