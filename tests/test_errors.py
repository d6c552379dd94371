from p2ch_app.errors import UserError, brief


def test_brief_cuts_between_words_and_names_an_empty_message_by_its_type():
    err = RuntimeError("Exception thrown in SimpleITK ImageFileReader_Execute:\n  /src/ITK/Modules/IO/MetaImage: "
                       "file not found, or the file is a different size than the header says it should be")
    text = brief(err, 60)
    assert "\n" not in text and text.endswith(" ...") and len(text) <= 64
    assert text[:-4] == "Exception thrown in SimpleITK ImageFileReader_Execute:"
    assert brief(EOFError()) == "EOFError" and brief(ValueError("short")) == "short"


def test_a_command_replaces_the_fix_of_a_library_message():
    problem = "'x' is not a series UID: digits and dots (e.g. 1.2)"
    err = UserError(f"{problem}; pass a UID, or a file with --ct")
    assert str(err.with_fix("pass --series UID")) == f"{problem}; pass --series UID"
    assert isinstance(err.with_fix("x"), UserError)
