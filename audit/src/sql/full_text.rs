//! PostgreSQL's full-text vectors and queries, built here rather than by `to_tsvector`.
//!
//! PostgreSQL's text-search parser was half of the server's time writing a call (≈ 270 µs to
//! parse 4 KB of prompt and completion: it converts the text to wide characters and classifies
//! every character through the C library, then sorts every token). The store now splits the text
//! into words itself and sends the `tsvector` in PostgreSQL's binary form, which the server only
//! checks and copies ([`TsVector`]). Searches split their words the same way, so what is written
//! and what is searched always agree:
//!
//! - a word is a run of letters and digits (Unicode alphanumerics, not combining marks) and of the
//!   combining accents of Latin letters ([`is_removed_accent`]), lower-cased and with the accents
//!   of Latin letters removed, whether written in the letter (`é`) or after it (`e` and U+0301);
//!   everything else separates words, as SQLite's FTS5 `unicode61 remove_diacritics 2` tokenizer
//!   does. `INV-2024-0042` is the three words `inv`, `2024`, `0042` at consecutive positions;
//!   `Café` is `cafe`, in either form;
//! - a search word that splits into several words is searched as a phrase of them (`<->`), so
//!   `INV-2024-0042` finds that invoice number and not calls that hold the three parts apart;
//!   the search words must all match (`&`), as with `plainto_tsquery`;
//! - words hold no NUL (it is not alphanumeric), which the binary form ends each word with.
//!
//! PostgreSQL's own limits are kept, as `to_tsvector` keeps them: words longer than 2,046 bytes
//! are not indexed, positions above 16,383 count as 16,383, a word keeps at most 256 positions,
//! and the vector stops taking new words before it reaches 1 MB (where `to_tsvector` would fail
//! the whole batch with "string is too long for tsvector").

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

use foldhash::fast::RandomState;
use smallvec::{SmallVec, smallvec};
use sqlx::Postgres;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo};

/// The longest word PostgreSQL indexes, in bytes (`MAXSTRLEN - 1`).
const MAX_WORD_BYTES: usize = 2_046;
/// The highest position a `tsvector` holds (`MAXENTRYPOS - 1`); later words get this one.
const MAX_POSITION: u16 = 16_383;
/// Positions kept per word (`MAXNUMPOS`).
const MAX_POSITIONS_PER_WORD: usize = 256;
/// Bytes of words and positions a `tsvector` may hold (`MAXSTRPOS`), less a margin.
pub(super) const MAX_VECTOR_BYTES: usize = (1 << 20) - 1 - 4_096;

/// The words of `text`: runs of word characters ([`in_word`]), folded ([`fold`]). A run of
/// removed accents alone folds to nothing and is no word (it takes no position, as in SQLite).
fn words(text: &str) -> impl Iterator<Item = Cow<'_, str>> {
    text.split(|c: char| !in_word(c))
        .filter(|word| !word.is_empty())
        .map(fold)
        .filter(|word| !word.is_empty() && word.len() <= MAX_WORD_BYTES)
}

/// Whether `lexeme` is a word the store could index: one word that folds to itself. A `tsquery`
/// that needs a lexeme which is not ([`words`] never makes it) matches no vector the store made.
pub(super) fn is_word(lexeme: &str) -> bool {
    let mut split = words(lexeme);
    split.next().is_some_and(|word| word == lexeme) && split.next().is_none()
}

/// Whether `c` is part of a word: a letter or a digit, but not a combining mark (an Indic vowel
/// sign, an accent SQLite does not remove), which separates words in SQLite's `unicode61`
/// tokenizer; or a combining accent of Latin letters, which that tokenizer keeps in the word and
/// removes ([`is_removed_accent`]).
fn in_word(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric()
    } else {
        is_removed_accent(c)
            || (c.is_alphanumeric() && !unicode_normalization::char::is_combining_mark(c))
    }
}

/// Whether `c` is one of the combining accents that SQLite's `unicode61 remove_diacritics 2`
/// removes from a word wherever it stands (`sqlite3Fts5UnicodeIsdiacritic`): the accents of the
/// Latin letters that decompose into a letter and accents (grave, acute, circumflex, tilde,
/// macron, breve, dot, diaeresis, hook, ring, double acute, caron, double grave, inverted breve,
/// horn, dot below, diaeresis below, ring below, comma below, cedilla, ogonek, circumflex below,
/// breve below, tilde below, macron below). The other marks of U+0300–U+036F (an overline,
/// U+0305) separate words, as other combining marks do; checked against SQLite 3.40 for every
/// code point.
fn is_removed_accent(c: char) -> bool {
    matches!(
        c,
        '\u{300}'..='\u{304}'
            | '\u{306}'..='\u{30C}'
            | '\u{30F}'
            | '\u{311}'
            | '\u{31B}'
            | '\u{323}'..='\u{328}'
            | '\u{32D}'..='\u{32E}'
            | '\u{330}'..='\u{331}'
    )
}

/// A word as it is indexed and searched, folded as SQLite's FTS5 tokenizer `unicode61
/// remove_diacritics 2` folds it, so that both engines find the same calls: lower-cased letter
/// by letter (a final `ς` is a `σ`), and a letter that decomposes into an ASCII letter and
/// accents (`é`, `Ü`, `ñ`) is that ASCII letter, so `cafe` finds `Café`. Letters that do not
/// decompose so (`ß`, `ø`, `ł`, other scripts) stay as they are, as in SQLite. Accents written
/// apart ([`is_removed_accent`], after any letter) are dropped, so `Cafe` and U+0301 is `cafe`.
fn fold(word: &str) -> Cow<'_, str> {
    if word
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        return Cow::Borrowed(word);
    }
    let mut folded = String::with_capacity(word.len());
    for c in word.chars() {
        if c.is_ascii() {
            folded.push(c.to_ascii_lowercase());
            continue;
        }
        if is_removed_accent(c) {
            continue;
        }
        let mut base = None;
        unicode_normalization::char::decompose_canonical(c, |part| {
            base.get_or_insert(part);
        });
        match base {
            Some(base) if base.is_ascii_alphabetic() => folded.push(base.to_ascii_lowercase()),
            _ if c == 'ς' => folded.push('σ'),
            _ => folded.extend(c.to_lowercase()),
        }
    }
    Cow::Owned(folded)
}

/// Appends `word` quoted as a `tsquery` lexeme: in single quotes, with quotes
/// doubled and backslashes escaped (words hold neither, but the quoting does not rely on it).
fn push_quoted(out: &mut String, word: &str) {
    out.push('\'');
    for c in word.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// A `tsvector` in PostgreSQL's binary form (`tsvectorrecv`), bound as a parameter of type
/// `tsvector`: a big-endian 32-bit count of words, then each word in byte order, as its bytes, a
/// NUL, a 16-bit count of positions and the positions, 16 bits each, rising. The server checks
/// it (lengths, order, rising positions) and copies it; it parses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TsVector(Vec<u8>);

impl TsVector {
    /// The vector of `texts` read one after the other, every word with the positions it occurs
    /// at, and a position left free between two texts, so that a phrase never runs from one
    /// into the next (the prompt's last word and the completion's first are not side by side,
    /// as they are not in SQLite's index, which keeps them in two columns).
    pub(super) fn of(texts: &[&str]) -> TsVector {
        // Keys are one call's own words, the map lives for one call: a fast hash without DoS
        // resistance risks nothing.
        let mut positions: HashMap<Cow<'_, str>, SmallVec<[u16; 2]>, RandomState> =
            HashMap::with_capacity_and_hasher(
                texts.iter().map(|t| t.len() / 8).sum(),
                RandomState::default(),
            );
        let mut size = 0_usize;
        let mut position: u16 = 0;
        'texts: for text in texts {
            for word in words(text) {
                position = position.saturating_add(1).min(MAX_POSITION);
                // A new word's entry: its bytes (aligned to 2), a count and its first position.
                let cost = word.len().next_multiple_of(2) + 4;
                match positions.entry(word) {
                    Entry::Occupied(mut known) => {
                        let at = known.get_mut();
                        if at.len() < MAX_POSITIONS_PER_WORD && at.last() != Some(&position) {
                            at.push(position);
                            size += 2;
                        }
                    }
                    Entry::Vacant(_) if size + cost > MAX_VECTOR_BYTES => break 'texts,
                    Entry::Vacant(new) => {
                        size += cost;
                        new.insert(smallvec![position]);
                    }
                }
            }
            position = position.saturating_add(1).min(MAX_POSITION);
        }
        // PostgreSQL keeps words in byte order; given sorted, it does not sort them again. Most
        // words differ in their first 8 bytes, compared as one number (words hold no NUL, so
        // padding with zeros keeps the order).
        let mut entries: Vec<(u64, Cow<'_, str>, SmallVec<[u16; 2]>)> = positions
            .into_iter()
            .map(|(word, at)| {
                let mut head = [0_u8; 8];
                let len = word.len().min(8);
                head[..len].copy_from_slice(&word.as_bytes()[..len]);
                (u64::from_be_bytes(head), word, at)
            })
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut out = Vec::with_capacity(4 + size + entries.len());
        let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for (_, word, at) in &entries {
            out.extend_from_slice(word.as_bytes());
            out.push(0);
            let count = u16::try_from(at.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&count.to_be_bytes());
            for position in at {
                out.extend_from_slice(&position.to_be_bytes());
            }
        }
        TsVector(out)
    }
}

impl TsVector {
    /// Whether the vector holds no word.
    pub(super) fn is_empty(&self) -> bool {
        self.0.get(..4).is_none_or(|count| count == [0; 4])
    }

    /// Its size in PostgreSQL's binary form, in bytes.
    pub(super) fn size(&self) -> usize {
        self.0.len()
    }

    /// Its words, in byte order.
    fn words(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.0.get(4..).unwrap_or_default();
        std::iter::from_fn(move || {
            let end = rest.iter().position(|&b| b == 0)?;
            let word = &rest[..end];
            let count = rest.get(end + 1..end + 3)?;
            let positions = usize::from(u16::from_be_bytes([count[0], count[1]]));
            rest = rest.get(end + 3 + 2 * positions..).unwrap_or_default();
            Some(word)
        })
    }

    /// Every word of `vectors`, once, without positions (as `strip` leaves a vector): what a
    /// block of calls is found by in the word index. Within PostgreSQL's size limit as long as
    /// the vectors together are.
    pub(super) fn union_of<'a>(vectors: impl IntoIterator<Item = &'a TsVector>) -> TsVector {
        let mut words: Vec<&[u8]> = vectors.into_iter().flat_map(TsVector::words).collect();
        // Byte order, shorter first on a common prefix: PostgreSQL's order of lexemes.
        words.sort_unstable();
        words.dedup();
        let mut out = Vec::with_capacity(4 + words.iter().map(|w| w.len() + 3).sum::<usize>());
        let count = u32::try_from(words.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for word in words {
            out.extend_from_slice(word);
            out.push(0);
            out.extend_from_slice(&0_u16.to_be_bytes());
        }
        TsVector(out)
    }
}

impl sqlx::Type<Postgres> for TsVector {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("tsvector")
    }
}

impl sqlx::postgres::PgHasArrayType for TsVector {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("_tsvector")
    }
}

impl sqlx::Encode<'_, Postgres> for TsVector {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
}

/// The `tsquery` (as text, for `$n::tsquery`) that finds calls holding every search word of
/// `text` (split at white space), a word that splits into several as a phrase; `None` when
/// `text` holds no word at all.
pub(super) fn tsquery(text: &str) -> Option<String> {
    query(text, " <-> ")
}

/// The `tsquery` that finds the blocks of calls holding every word of `text`, a search word that
/// splits into several as all of its parts (a block's words have no positions, and a phrase
/// never matches such a vector); `None` when `text` holds no word at all. It finds a superset
/// of the blocks whose calls [`tsquery`] finds.
pub(super) fn block_tsquery(text: &str) -> Option<String> {
    query(text, " & ")
}

/// The query of `text`'s search words joined by `&`, the parts of each joined by `within`.
fn query(text: &str, within: &str) -> Option<String> {
    let mut out = String::new();
    for search_word in text.split_whitespace() {
        let mut parts = words(search_word).peekable();
        if parts.peek().is_none() {
            continue;
        }
        if !out.is_empty() {
            out.push_str(" & ");
        }
        out.push('(');
        for (i, part) in parts.enumerate() {
            if i > 0 {
                out.push_str(within);
            }
            push_quoted(&mut out, &part);
        }
        out.push(')');
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl TsVector {
        /// The vector's text form, read back from its binary form.
        fn to_text(&self) -> String {
            let mut rest = &self.0[4..];
            let mut words = Vec::new();
            let take16 = |rest: &mut &[u8]| {
                let value = u16::from_be_bytes([rest[0], rest[1]]);
                *rest = &rest[2..];
                value
            };
            while !rest.is_empty() {
                let end = rest.iter().position(|&b| b == 0).unwrap();
                let word = std::str::from_utf8(&rest[..end]).unwrap().to_owned();
                rest = &rest[end + 1..];
                let count = take16(&mut rest);
                let at: Vec<String> = (0..count).map(|_| take16(&mut rest).to_string()).collect();
                words.push(format!("'{word}':{}", at.join(",")));
            }
            assert_eq!(
                u32::from_be_bytes(self.0[..4].try_into().unwrap()) as usize,
                words.len()
            );
            words.join(" ")
        }
    }

    /// Time per call of 4 KB of prompt and completion (`cargo test --release -p gatehouse-audit
    /// full_text::tests::timing -- --ignored --nocapture`).
    #[test]
    #[ignore = "prints a timing"]
    fn timing() {
        // 2 KB prompts and completions of words from a vocabulary of 2,000, a quarter of them
        // invoice numbers, amounts and ticket ids, as the store_write benchmark writes.
        let mut seed = 1_u64;
        let mut next = move |below: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % below
        };
        let mut text = |bytes: usize| {
            let mut out = String::from("[{\"role\":\"user\",\"content\":\"");
            while out.len() < bytes {
                match next(8) {
                    0 => out.push_str(&format!("INV-{:06} ", next(1_000_000))),
                    1 => out.push_str(&format!("{}.{:02} ", next(10_000), next(100))),
                    _ => out.push_str(&format!("word{} ", next(2_000))),
                }
            }
            out.push_str("\"}]");
            out
        };
        let calls: Vec<(String, String)> = (0..2_000).map(|_| (text(2_048), text(2_048))).collect();
        let started = std::time::Instant::now();
        let mut bytes = 0;
        for _ in 0..5 {
            for (prompt, completion) in &calls {
                bytes += TsVector::of(&[prompt, completion]).0.len();
            }
        }
        println!(
            "{:?} per call ({} bytes a vector)",
            started.elapsed() / 10_000,
            bytes / 10_000
        );
    }

    #[test]
    fn words_are_runs_of_letters_and_digits_lower_cased() {
        let split: Vec<Cow<'_, str>> =
            words("Invoice INV-2024-0042, café Ünïcode\n\\nx_y 3.14").collect();
        assert_eq!(
            split,
            [
                "invoice", "inv", "2024", "0042", "cafe", "unicode", "nx", "y", "3", "14"
            ]
        );
    }

    /// Folded as SQLite's `unicode61 remove_diacritics 2` folds (checked against SQLite 3.40:
    /// `cafe`, `οδοσ` and `οδος` match; `strasse`, `ore` and `lodz` do not).
    #[test]
    fn words_are_folded_as_sqlite_folds_them() {
        let split: Vec<Cow<'_, str>> =
            words("CAFÉ Café Cafe\u{301} ÑANDÚ ΟΔΟΣ ΟΔΟς straße Øre Łódź Привет").collect();
        assert_eq!(
            split,
            [
                "cafe",
                "cafe",
                "cafe",
                "nandu",
                "οδοσ",
                "οδοσ",
                "straße",
                "øre",
                "łodz",
                "привет"
            ]
        );
        // Indic vowel signs and viramas are marks, which separate words in both engines.
        assert_eq!(words("हिन्दी").count(), 3);
    }

    /// Accents written apart from their letter are dropped inside a word, where SQLite's
    /// `unicode61 remove_diacritics 2` drops them (checked against SQLite 3.40 for every combining
    /// mark it knows, after a Latin letter, after a Greek one and alone): `na\u{303}o` is `nao`,
    /// an overline (U+0305) still separates words, and accents alone are no word and take no
    /// position.
    #[test]
    fn accents_written_apart_are_dropped_inside_words() {
        let split: Vec<Cow<'_, str>> = words(
            "Na\u{303}o cafe\u{301}x \u{301}abc x\u{305}y a\u{308}\u{301}b \u{3b1}\u{301}\u{3b2}",
        )
        .collect();
        assert_eq!(split, ["nao", "cafex", "abc", "x", "y", "ab", "αβ"]);
        assert_eq!(
            TsVector::of(&["abc \u{301}\u{300} def"]).to_text(),
            "'abc':1 'def':2"
        );
        assert_eq!(tsquery("NA\u{303}O").as_deref(), Some("('nao')"));
        assert_eq!(tsquery("não"), tsquery("na\u{303}o"));
    }

    /// The words the store may index: what PostgreSQL's parser made of calls stored before, and
    /// the store never makes, is none of them.
    #[test]
    fn a_word_is_what_the_store_could_index() {
        for word in ["nao", "cafe", "2024", "οδοσ", "straße", "привет"] {
            assert!(is_word(word), "{word}");
        }
        for lexeme in [
            "",
            "não",
            "na\u{303}o",
            "Nao",
            "bob@contoso.com",
            "1234.56",
            "-2024",
            "user_id",
            "οδος",
        ] {
            assert!(!is_word(lexeme), "{lexeme}");
        }
    }

    #[test]
    fn a_vector_lists_each_word_once_in_byte_order_with_its_positions() {
        // The second text starts a position after the first's last word plus one.
        assert_eq!(
            TsVector::of(&["the cat saw the", "Cat"]).to_text(),
            "'cat':2,6 'saw':3 'the':1,4"
        );
        assert_eq!(TsVector::of(&["", "  ", "--"]).to_text(), "");
    }

    #[test]
    fn vectors_keep_postgres_limits() {
        let long = "a".repeat(MAX_WORD_BYTES + 1);
        assert_eq!(TsVector::of(&[&format!("{long} b")]).to_text(), "'b':1");

        let many = "w ".repeat(20_000);
        let vector = TsVector::of(&[&many]).to_text();
        assert_eq!(vector.matches(',').count() + 1, MAX_POSITIONS_PER_WORD);

        let late = format!("{}late", "x ".repeat(20_000));
        assert!(TsVector::of(&[&late]).to_text().contains("'late':16383"));

        // Distinct words until the vector would pass 1 MB, then no more.
        let distinct: String = (0..200_000).map(|i| format!("w{i} ")).collect();
        let vector = TsVector::of(&[&distinct]).to_text();
        assert!(vector.len() < 2 * MAX_VECTOR_BYTES);
        assert!(vector.contains("'w0':1") && !vector.contains("'w199999'"));
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        let mut out = String::new();
        push_quoted(&mut out, r"it's a \ word");
        assert_eq!(out, r"'it''s a \\ word'");
    }

    #[test]
    fn queries_and_their_words_and_split_words_as_phrases() {
        assert_eq!(
            tsquery("Number 42 INV-2024-0042").as_deref(),
            Some("('number') & ('42') & ('inv' <-> '2024' <-> '0042')")
        );
        assert_eq!(
            tsquery(r#""invoices" OR NEAR( * !"#).as_deref(),
            Some("('invoices') & ('or') & ('near')")
        );
        assert_eq!(tsquery("  ?? -- "), None);
        assert_eq!(
            block_tsquery("Number INV-2024-0042").as_deref(),
            Some("('number') & ('inv' & '2024' & '0042')")
        );
        assert_eq!(block_tsquery("  ?? -- "), None);
    }

    #[test]
    fn a_union_holds_each_word_of_its_vectors_once_without_positions() {
        let union = TsVector::union_of([
            &TsVector::of(&["the cat saw", "a dog"]),
            &TsVector::of(&["cat catalog ca"]),
            &TsVector::of(&[""]),
        ]);
        assert_eq!(
            union.to_text(),
            "'a': 'ca': 'cat': 'catalog': 'dog': 'saw': 'the':"
        );
        assert!(!union.is_empty());
        assert!(TsVector::union_of([&TsVector::of(&["--"])]).is_empty());
        assert!(TsVector::of(&["--"]).is_empty());
    }
}
