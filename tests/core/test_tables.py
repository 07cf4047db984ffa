from factory.core.tables import cell, text_table


def test_cell_rounds_and_counts_and_marks_no_value():
    assert cell(91.234) == "91.23" and cell(91.25, 1) == "91.2" and cell(None) == "-"
    assert cell(75.3, samples=92) == "75.30 (92)"


def test_text_table_aligns_names_left_and_numbers_right():
    table = text_table(["Method", "Split", "Seen"], [["module", "1", "91.23"], ["", "Average", "8.00"]])
    assert table.splitlines() == ["Method  Split     Seen",
                                  "----------------------",
                                  "module  1        91.23",
                                  "        Average   8.00"]
