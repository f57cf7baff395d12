//! The README's claims about the hostile suite, checked against the suite itself: every row
//! of the findings tables in `e2e/hostile/README.md` names a test that exists in the file it
//! names, and no hostile test is `#[ignore]`d (an ignored test is how an open finding is
//! kept), so "no open finding" stays true only while it is.

use std::collections::BTreeSet;

use kubemail_e2e::local_env::workspace_root;

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace_root().join(path))
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `file::function` references in the findings rows (`| F1 |`, `| R2-3 |`, ...).
fn referenced_tests(readme: &str) -> BTreeSet<(String, String)> {
    readme
        .lines()
        .filter(|l| l.starts_with("| F") || l.starts_with("| R2-"))
        .flat_map(|l| {
            l.split('`')
                .skip(1)
                .step_by(2)
                .filter_map(|code| {
                    let (file, function) = code.split_once("::")?;
                    let ident = |s: &str| {
                        !s.is_empty()
                            && s.chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    };
                    (file.starts_with("hostile_") && ident(file) && ident(function))
                        .then(|| (file.to_owned(), function.to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_finding_names_a_test_that_exists_and_none_is_ignored() {
    let readme = read("e2e/hostile/README.md");
    let tests = referenced_tests(&readme);
    assert!(
        tests.len() >= 15,
        "the findings tables name their tests: {tests:?}"
    );
    for (file, function) in &tests {
        let source = read(&format!("e2e/tests/{file}.rs"));
        assert!(
            source.contains(&format!("fn {function}(")),
            "e2e/hostile/README.md names {file}::{function}, which e2e/tests/{file}.rs does not define"
        );
    }
    let files: BTreeSet<&String> = tests.iter().map(|(f, _)| f).collect();
    for file in files {
        let source = read(&format!("e2e/tests/{file}.rs"));
        assert!(
            !source.contains("#[ignore"),
            "e2e/tests/{file}.rs keeps an ignored test: an open finding, so the README's \"no open finding\" is false"
        );
    }
}

#[test]
fn a_row_naming_a_missing_test_is_caught() {
    let rows =
        "| R2-9 | x | y | `hostile_abuse::no_such_test` |\n| other | `hostile_abuse::skipped` |\n";
    assert_eq!(
        referenced_tests(rows),
        BTreeSet::from([("hostile_abuse".to_owned(), "no_such_test".to_owned())])
    );
}
