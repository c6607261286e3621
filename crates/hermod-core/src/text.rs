//! Message text made safe for the places it is *shown* or *typed*: one
//! line per message, nothing that a terminal, a shell or a file system
//! would act on.
//!
//! Anyone who can send a message controls its text, and the text ends up
//! on an agent's terminal (`hermod recv`, `wait`, `inbox`, `tail`), typed
//! into a tmux pane by a wake-up action, or as a file name when an
//! attachment is saved. Each of those is a small interpreter: a terminal
//! runs escape sequences, a pane that fell back to a shell runs command
//! lines, a file system follows `..` and overwrites dotfiles. All the rules
//! live here, in one place, so every caller gets the same ones:
//!
//! - [`terminal_line`]: for a terminal. Every character that moves the
//!   cursor, starts an escape sequence, breaks the line or reorders the
//!   display is written as a visible escape (`\n`, `\e`, `\u{9b}` …), and a
//!   long text is cut with a marker saying how much is missing.
//! - [`pane_line`]: for what a wake-up *types* into a pane. Stricter: the
//!   line must also be a harmless command line in any shell (see there).
//! - [`file_name`]: a sender's attachment name reduced to one plain,
//!   visible, non-hidden file name.

/// Characters that are invisible yet act: C0 controls (line breaks, ESC,
/// BEL …), DEL, C1 controls (U+0080–U+009F; U+009B is a one-byte CSI to
/// some terminals), the Unicode line and paragraph separators, and the
/// bidirectional marks, embeddings, overrides and isolates that reorder
/// what is displayed ("Trojan Source"): with them a line can look like
/// something else than what it says.
pub fn is_hazard(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}'                  // line / paragraph separator
                | '\u{202A}'..='\u{202E}'            // embeddings and overrides
                | '\u{2066}'..='\u{2069}'            // isolates
                | '\u{200E}' | '\u{200F}' | '\u{061C}' // LRM, RLM, ALM
        )
}

/// `s` as one terminal line: hazards (see [`is_hazard`]) and the backslash
/// written as visible escapes, at most `max_chars` characters including the
/// cut marker (` … [N more chars]`, N counted in characters of `s`).
///
/// The backslash is escaped too (`\\`) so the escapes are unambiguous: a
/// sender cannot write a literal `\n` that reads like a line break was
/// there.
pub fn terminal_line(s: &str, max_chars: usize) -> String {
    terminal_line_cut(s, max_chars).0
}

/// [`terminal_line`], also returning how many characters of `s` were cut
/// (0 when all of it is shown), for callers that add a hint on where to see
/// the rest.
pub fn terminal_line_cut(s: &str, max_chars: usize) -> (String, usize) {
    capped(s, max_chars, escape_terminal, |n| {
        format!(" … [{n} more chars]")
    })
}

fn escape_terminal(c: char, out: &mut String) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{1b}' => out.push_str("\\e"),
        c if is_hazard(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        c => out.push(c),
    }
}

/// The fixed first word of every line a wake-up types into a pane (see
/// [`pane_line`]): `[hermod]` in fullwidth brackets, so it reads like the
/// familiar tag but is no command, builtin, keyword or glob in any shell.
pub const PANE_PREFIX: &str = "\u{FF3B}hermod\u{FF3D}";

/// `s` made harmless to *type* into a tmux pane, at most `max_chars`
/// characters (cut marker ` … N more chars`).
///
/// The pane normally runs an agent's CLI, but it may have fallen back to a
/// plain shell — bash, dash, zsh (even without `interactive_comments`, so
/// `#` does not start a comment) or fish — and the typed line is then a
/// command line. So no character with meaning to any of them survives:
///
/// - ASCII letters, digits, space and `. , : - _ / @ +` are kept: none of
///   them is special in those shells where it can occur here (not the
///   first word, no `(` after `@`/`+`, so no ksh extglob).
/// - Every other ASCII punctuation becomes its fullwidth form (`;` → `；`,
///   `$` → `＄`, `` ` `` → `｀`, `|` → `｜` …; U+FF01–U+FF5E is ASCII +
///   0xFEE0). That covers the separators and operators (`; & | < > ( )`),
///   every expansion (`$ `` ` `` ~ { } * ? [ ]`, zsh's `=cmd`, fish's `%`),
///   quoting (`' " \`), history (`! ^ #`) and job control (`%`). Shells
///   tokenise on ASCII bytes only, so the fullwidth forms are plain
///   letters to them, and to a reader they still look like what was sent.
/// - C0 controls become Unicode control pictures (U+2400 + code, `␊` for
///   a line feed, `␛` for ESC, `␉` for a tab, which would complete) and
///   DEL becomes `␡`: no Enter, ^C, ^U or escape sequence can be typed,
///   and tmux has no key to bind them to.
/// - Other hazards (C1 controls, line separators, bidi controls) and the
///   private-use and noncharacter code points fish uses internally for
///   wildcards become U+FFFD.
///
/// The result is letters and punctuation-as-letters: a simple command
/// whose words undergo no expansion. Callers start it with
/// [`PANE_PREFIX`] (written `[hermod]` before mapping), so the command
/// word is fixed and is no command anywhere. The old prefix `[hermod]` as
/// typed was itself a glob (`[` opens a bracket expression): in a
/// directory holding a file named `h`, bash would have run `h`.
pub fn pane_line(s: &str, max_chars: usize) -> String {
    capped(s, max_chars, escape_pane, |n| format!(" … {n} more chars")).0
}

fn escape_pane(c: char, out: &mut String) {
    let mapped = match c {
        'a'..='z' | 'A'..='Z' | '0'..='9' | ' ' | '.' | ',' | ':' | '-' | '_' | '/' | '@' | '+' => {
            c
        }
        '!'..='~' => char::from_u32(c as u32 + 0xFEE0).expect("fullwidth forms exist"),
        '\0'..='\u{1f}' => char::from_u32(0x2400 + c as u32).expect("control pictures exist"),
        '\u{7f}' => '\u{2421}',
        c if is_hazard(c)
            || ('\u{E000}'..='\u{F8FF}').contains(&c)
            || ('\u{FDD0}'..='\u{FDEF}').contains(&c) =>
        {
            '\u{FFFD}'
        }
        c => c,
    };
    out.push(mapped);
}

/// Escapes every character of `s` and, if the result is longer than
/// `max_chars`, cuts it at a character boundary of `s` (an escape is never
/// split) and appends `marker(characters of s not shown)`. The marker is
/// sized for the worst case first, so the result never exceeds
/// `max_chars` unless the marker alone does.
fn capped(
    s: &str,
    max_chars: usize,
    escape: fn(char, &mut String),
    marker: fn(usize) -> String,
) -> (String, usize) {
    let mut out = String::with_capacity(s.len().min(max_chars * 4));
    let mut piece = String::new();
    let mut shown = 0; // chars in `out`
    let total = s.chars().count();
    let budget = max_chars.saturating_sub(marker(total).chars().count());
    let mut at_budget: Option<(usize, usize)> = None; // (bytes of out, chars of s) within budget
    for (i, c) in s.chars().enumerate() {
        piece.clear();
        escape(c, &mut piece);
        let len = piece.chars().count();
        if at_budget.is_none() && shown + len > budget {
            at_budget = Some((out.len(), i));
        }
        if shown + len > max_chars {
            let (bytes, taken) = at_budget.expect("budget <= max_chars");
            out.truncate(bytes);
            let cut = total - taken;
            out.push_str(&marker(cut));
            return (out, cut);
        }
        out.push_str(&piece);
        shown += len;
    }
    (out, 0)
}

/// A sender's attachment name as one safe file name of at most `max_bytes`
/// bytes, or `None` when nothing usable is left (the caller picks a name).
///
/// Only the last component counts (after `/` *and* `\`, so
/// `..\..\x` from a Windows sender is `x` too); hazards are dropped;
/// surrounding whitespace and *leading dots* are stripped, so the result is
/// never `.`, `..` or a hidden file (`.bashrc` → `bashrc`); a long name
/// keeps its extension (up to 16 bytes) and loses the end of its stem.
pub fn file_name(raw: &str, max_bytes: usize) -> Option<String> {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !is_hazard(*c)).collect();
    let name = clean.trim().trim_start_matches('.').trim_start();
    if name.is_empty() {
        return None;
    }
    if name.len() <= max_bytes {
        return Some(name.to_owned());
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && name.len() - i <= 16 && name.len() - i < max_bytes => name.split_at(i),
        _ => (name, ""),
    };
    let mut end = max_bytes - ext.len();
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    let stem = stem[..end].trim_end();
    if stem.is_empty() {
        return None;
    }
    Some(format!("{stem}{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_line_escapes_every_hazard_visibly() {
        let s = "a\nb\r\tc\u{1b}[2J\u{1b}]0;x\u{7}\u{7f}\u{9b}31m\u{2028}\u{202e}evil\u{2066}\u{2069}\u{200f}\\n";
        assert_eq!(
            terminal_line(s, 1000),
            r"a\nb\r\tc\e[2J\e]0;x\u{7}\u{7f}\u{9b}31m\u{2028}\u{202e}evil\u{2066}\u{2069}\u{200f}\\n"
        );
        let line = terminal_line(s, 1000);
        assert!(!line.chars().any(is_hazard), "{line:?}");
    }

    #[test]
    fn terminal_line_keeps_ordinary_unicode() {
        assert_eq!(terminal_line("línea 1 🚀 第二行", 100), "línea 1 🚀 第二行");
        assert_eq!(terminal_line("", 10), "");
    }

    #[test]
    fn terminal_line_caps_with_a_marker_saying_how_much_was_cut() {
        let s = "x".repeat(100);
        let (line, cut) = terminal_line_cut(&s, 40);
        assert!(line.chars().count() <= 40, "{line}");
        assert!(line.starts_with("xxxx"));
        let kept = line.chars().take_while(|c| *c == 'x').count();
        assert_eq!(cut, 100 - kept);
        assert!(line.ends_with(&format!(" … [{cut} more chars]")), "{line}");
        // Exactly at the cap: nothing cut.
        assert_eq!(terminal_line_cut(&"y".repeat(40), 40), ("y".repeat(40), 0));
        // An escape is never split by the cut.
        let line = terminal_line(&"\n".repeat(100), 30);
        assert!(
            line.starts_with(r"\n\n") && !line.contains(r"\ …"),
            "{line}"
        );
        assert!(line.chars().count() <= 30);
    }

    #[test]
    fn pane_line_leaves_no_shell_metacharacter_or_control() {
        let s = "hi; touch /tmp/p & $(id) `id` | sh > f < g\n\r\u{1b}[2J\u{3}\t'\"\\!*?~#^%{}[]()=\u{7f}\u{9b}\u{202e}\u{f600}";
        let line = pane_line(s, 1000);
        for c in line.chars() {
            assert!(
                c.is_ascii_alphanumeric() || " .,:-_/@+".contains(c) || !c.is_ascii(),
                "{c:?} survived in {line}"
            );
            assert!(!is_hazard(c), "{c:?} survived in {line}");
        }
        assert_eq!(
            line,
            "hi； touch /tmp/p ＆ ＄（id） ｀id｀ ｜ sh ＞ f ＜ g␊␍␛［2J␃␉＇＂＼！＊？～＃＾％｛｝［］（）＝␡\u{fffd}\u{fffd}\u{fffd}"
        );
        assert_eq!(pane_line("[hermod]", 100), PANE_PREFIX);
    }

    #[test]
    fn pane_line_keeps_readable_text_and_caps() {
        assert_eq!(
            pane_line("please review PR 42, see a/b.rs:10 - thanks @leo +1", 200),
            "please review PR 42, see a/b.rs:10 - thanks @leo +1"
        );
        assert_eq!(pane_line("über ✓ 第二行", 100), "über ✓ 第二行");
        let line = pane_line(&"z".repeat(500), 100);
        assert!(line.chars().count() <= 100);
        assert!(line.ends_with(" more chars"), "{line}");
        assert!(line
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '…'));
    }

    #[test]
    fn file_names_are_plain_visible_basenames() {
        assert_eq!(file_name("report.pdf", 200).as_deref(), Some("report.pdf"));
        assert_eq!(file_name("../../.bashrc", 200).as_deref(), Some("bashrc"));
        assert_eq!(
            file_name("..\\..\\evil.exe", 200).as_deref(),
            Some("evil.exe")
        );
        assert_eq!(file_name("/etc/passwd", 200).as_deref(), Some("passwd"));
        assert_eq!(
            file_name("a\nb\u{1b}c\u{202e}d.txt", 200).as_deref(),
            Some("abcd.txt")
        );
        assert_eq!(file_name(" ...hidden ", 200).as_deref(), Some("hidden"));
        for nothing in ["", "..", ".", "a/", "/", "...", "\u{1b}\n", "dir/.."] {
            assert_eq!(file_name(nothing, 200), None, "{nothing:?}");
        }
        let long = format!("{}.tar.gz", "é".repeat(300));
        let name = file_name(&long, 100).unwrap();
        assert!(name.len() <= 100 && name.ends_with(".gz"), "{name}");
        assert!(name.starts_with('é'));
        let name = file_name(&"n".repeat(300), 50).unwrap();
        assert_eq!(name, "n".repeat(50));
    }
}
