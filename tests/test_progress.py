import sys

from gpt2lab.progress import Progress


def test_log_file_gets_a_line_per_tenth(capsys):
    bar = Progress("job", 100)
    for done in range(1, 101):
        bar.update(done, "note")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("job [##") and "10/100" in lines[0] and lines[0].endswith("note")
    assert "100/100" in lines[-1] and "#" * 20 in lines[-1]


def test_unknown_total_and_disabled_write_nothing_to_a_log(capsys):
    for bar in (Progress("stream"), Progress("off", 10, enabled=False), Progress("empty", 0)):
        for done in range(1, 11):
            bar.update(done)
        bar.close()
    assert capsys.readouterr().err == ""


def test_terminal_redraws_in_place_and_ends_the_line(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progress("job", 3, every=0.0)
    for done in (1, 2, 3):
        bar.update(done)
    bar.close()
    err = capsys.readouterr().err
    assert err.count("\r") == 3 and err.endswith("\n") and "3/3" in err
