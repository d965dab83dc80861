//! The knowledge base (`x-nself-knowledge: true`): Markdown documents about nSelf and ɳClaw,
//! shipped in the binary (the repository's `knowledge/`) or read from `CLAW_KNOWLEDGE_DIR`
//! (indexed again whenever a file there changes). Each document is split into passages at its
//! `## ` headings; a request's last user message is the query, ranked by BM25 (tantivy: English
//! stemming, stop words and question words left out) over the passages' titles and text, and
//! the best passages are given to the model with their titles.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use include_dir::{include_dir, Dir};
use tantivy::collector::TopDocs;
use tantivy::query::QueryParser;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value as _, STORED,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{doc, Index, IndexReader, TantivyDocument};

/// The documents shipped with the gateway.
static SHIPPED: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../knowledge");

/// How often a knowledge directory is checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Passages given to the model per request.
pub const PASSAGES: usize = 3;
/// The analyzer's name in the index.
const ANALYZER: &str = "knowledge";
/// Words that carry no topic, left out of the index and of queries: Lucene's English list,
/// plus the question words and pronouns that questions are made of.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with", "how", "what", "why", "when", "where", "which",
    "who", "do", "does", "did", "can", "could", "should", "would", "i", "me", "my", "you", "your",
    "we", "our", "us", "about", "please", "explain", "tell",
];

/// One searchable piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    /// `Document title › Section`.
    pub title: String,
    pub text: String,
    /// The document's file name.
    pub source: String,
}

/// The passages and their index.
struct Indexed {
    passages: Vec<Passage>,
    reader: IndexReader,
    parser: QueryParser,
    id: Field,
}

/// The searchable knowledge base; cheap to share.
pub struct KnowledgeBase {
    current: RwLock<Arc<Indexed>>,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase")
            .field("passages", &self.snapshot().passages.len())
            .finish()
    }
}

impl KnowledgeBase {
    /// The documents shipped with the gateway.
    pub fn shipped() -> Result<Self, String> {
        let documents: Vec<(String, String)> = SHIPPED
            .files()
            .filter(|f| f.path().extension().is_some_and(|e| e == "md"))
            .filter_map(|f| {
                Some((
                    f.path().display().to_string(),
                    f.contents_utf8()?.to_owned(),
                ))
            })
            .collect();
        Self::from_documents(&documents)
    }

    /// The Markdown documents in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, String> {
        Self::from_documents(&read_dir(dir)?)
    }

    fn from_documents(documents: &[(String, String)]) -> Result<Self, String> {
        Ok(Self {
            current: RwLock::new(Arc::new(index(documents)?)),
        })
    }

    fn snapshot(&self) -> Arc<Indexed> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many passages are indexed.
    pub fn len(&self) -> usize {
        self.snapshot().passages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `limit` passages that answer `query` best, best first.
    pub fn search(&self, query: &str, limit: usize) -> Vec<Passage> {
        let indexed = self.snapshot();
        let (query, _unparsed) = indexed.parser.parse_query_lenient(query);
        let searcher = indexed.reader.searcher();
        let Ok(top) = searcher.search(&query, &TopDocs::with_limit(limit).order_by_score()) else {
            return Vec::new();
        };
        top.into_iter()
            .filter_map(|(_, address)| {
                let doc: TantivyDocument = searcher.doc(address).ok()?;
                let id = doc.get_first(indexed.id)?.as_u64()?;
                indexed.passages.get(usize::try_from(id).ok()?).cloned()
            })
            .collect()
    }

    /// Indexes `dir` again whenever one of its documents changes, is added or is removed,
    /// until the knowledge base is dropped.
    pub fn watch(self: &Arc<Self>, dir: PathBuf) {
        let kb = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut seen = fingerprint(&dir);
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                let Some(kb) = kb.upgrade() else { return };
                let now = fingerprint(&dir);
                if now == seen {
                    continue;
                }
                seen = now;
                let dir = dir.clone();
                let rebuilt =
                    tokio::task::spawn_blocking(move || read_dir(&dir).and_then(|d| index(&d)))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r);
                match rebuilt {
                    Ok(indexed) => {
                        tracing::info!(
                            passages = indexed.passages.len(),
                            "knowledge base re-indexed"
                        );
                        *kb.current
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(indexed);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "knowledge base not re-indexed; keeping the previous index");
                    }
                }
            }
        });
    }
}

/// The Markdown files of `dir`, by name.
fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut documents = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "md") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            documents.push((name, text));
        }
    }
    documents.sort();
    Ok(documents)
}

/// What the watcher compares: each Markdown file's name, size and modification time.
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "md"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    files.sort();
    files
}

/// Splits a document into passages: the text before the first `## ` heading (titled by the
/// document's `# ` title), then one per `## ` section.
fn passages(source: &str, text: &str) -> Vec<Passage> {
    let mut doc_title = source.trim_end_matches(".md").to_owned();
    let mut out = Vec::new();
    let mut title: Option<String> = None;
    let mut body = String::new();
    let mut flush = |title: &Option<String>, body: &mut String, doc_title: &str| {
        let text = body.trim();
        if !text.is_empty() {
            out.push(Passage {
                title: title
                    .as_ref()
                    .map_or_else(|| doc_title.to_owned(), |t| format!("{doc_title} › {t}")),
                text: text.to_owned(),
                source: source.to_owned(),
            });
        }
        body.clear();
    };
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# ") {
            t.trim().clone_into(&mut doc_title);
        } else if let Some(t) = line.strip_prefix("## ") {
            flush(&title, &mut body, &doc_title);
            title = Some(t.trim().to_owned());
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(&title, &mut body, &doc_title);
    out
}

/// Indexes the passages of `documents` in memory.
fn index(documents: &[(String, String)]) -> Result<Indexed, String> {
    let err = |e: tantivy::TantivyError| format!("knowledge index: {e}");
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let mut schema = Schema::builder();
    let title = schema.add_text_field("title", text.clone());
    let body = schema.add_text_field("body", text);
    let id = schema.add_u64_field("id", STORED);
    let index = Index::create_in_ram(schema.build());
    index.tokenizers().register(
        ANALYZER,
        TextAnalyzer::builder(SimpleTokenizer::default())
            .filter(RemoveLongFilter::limit(40))
            .filter(LowerCaser)
            .filter(StopWordFilter::remove(
                STOP_WORDS.iter().map(|w| (*w).to_owned()),
            ))
            .filter(Stemmer::new(Language::English))
            .build(),
    );
    let passages: Vec<Passage> = documents
        .iter()
        .flat_map(|(source, text)| passages(source, text))
        .collect();
    let mut writer = index
        .writer_with_num_threads::<TantivyDocument>(1, 15_000_000)
        .map_err(err)?;
    for (n, p) in passages.iter().enumerate() {
        writer
            .add_document(doc!(title => p.title.as_str(), body => p.text.as_str(), id => n as u64))
            .map_err(err)?;
    }
    writer.commit().map_err(err)?;
    let reader = index.reader().map_err(err)?;
    let mut parser = QueryParser::for_index(&index, vec![title, body]);
    parser.set_field_boost(title, 2.0);
    Ok(Indexed {
        passages,
        reader,
        parser,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn best_source(kb: &KnowledgeBase, question: &str) -> String {
        kb.search(question, 1)
            .first()
            .map(|p| p.source.clone())
            .unwrap_or_default()
    }

    #[test]
    fn real_questions_find_the_right_documents() {
        let kb = KnowledgeBase::shipped().unwrap();
        assert!(kb.len() >= 20, "{} passages", kb.len());
        for (question, source) in [
            ("Explain nSelf plugins", "nself-plugins.md"),
            ("How do I revoke a key?", "claw-keys.md"),
            (
                "Why does my stream arrive all at once behind nginx?",
                "claw-nginx.md",
            ),
            ("What happens when Ollama is at capacity?", "claw-tiers.md"),
            (
                "How can I check how many tokens each key used this week?",
                "claw-usage-and-ledger.md",
            ),
            (
                "How do I run several gateways with Kafka and Postgres?",
                "claw-distributed.md",
            ),
        ] {
            assert_eq!(best_source(&kb, question), source, "{question}");
        }
        let keys = kb.search("How do I revoke a key?", 1);
        assert_eq!(keys[0].title, "ɳClaw gateway keys › How do I revoke a key?");
        assert!(keys[0].text.contains("nself claw api keys revoke"));
    }

    #[test]
    fn odd_queries_do_not_fail() {
        let kb = KnowledgeBase::shipped().unwrap();
        for q in ["", "\"unbalanced", "title:", "a AND OR", "*?"] {
            let _ = kb.search(q, 3);
        }
    }

    #[test]
    fn documents_split_at_second_level_headings() {
        let p = passages("doc.md", "# Guide\nintro\n## First\none\n## Second\ntwo\n");
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["Guide", "Guide › First", "Guide › Second"]);
        assert_eq!(p[2].text, "two");
    }
}
