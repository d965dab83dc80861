//! The knowledge base (`x-nself-knowledge: true`): Markdown documents about nSelf and ɳClaw,
//! shipped in the binary (the repository's `knowledge/`) or read from `CLAW_KNOWLEDGE_DIR`
//! (indexed again whenever a file there changes). Each document is split into passages at its
//! `## ` headings, and a request's last user message is the query. When the local tier's
//! embeddings model is up, passages are ranked by cosine similarity of their embeddings (the
//! passages are embedded once per index, in the background; the query on each request);
//! otherwise, or when that fails, by BM25 (tantivy: English stemming, stop and question words
//! left out) over their titles and text. The best passages go to the model with their titles.
//! Only the local tier embeds: the knowledge base never spends on the paid tier.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

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

use crate::router::Backend;

/// The documents shipped with the gateway.
static SHIPPED: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../knowledge");

/// How often a knowledge directory is checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// How long after a failed attempt the passages are embedded again.
const EMBED_EVERY: Duration = Duration::from_secs(5);
/// Passages per embeddings call.
const EMBED_BATCH: usize = 64;
/// Longest a request waits for its question's embedding before ranking with BM25.
const QUERY_EMBED_TIMEOUT: Duration = Duration::from_secs(2);
/// Index generations, so vectors are matched with the passages they were made from.
static GENERATION: AtomicU64 = AtomicU64::new(0);
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
    generation: u64,
    passages: Vec<Passage>,
    reader: IndexReader,
    parser: QueryParser,
    id: Field,
}

/// The passages' embeddings, one per passage of one index generation.
struct Vectors {
    generation: u64,
    rows: Vec<Vec<f32>>,
}

/// The local tier's embeddings model.
#[derive(Clone)]
pub struct Embedder {
    pub backend: Backend,
    pub model: String,
}

/// How passages were ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranking {
    Embeddings,
    Bm25,
}

impl Ranking {
    pub fn as_str(self) -> &'static str {
        match self {
            Ranking::Embeddings => "embeddings",
            Ranking::Bm25 => "bm25",
        }
    }
}

/// The searchable knowledge base; cheap to share.
pub struct KnowledgeBase {
    current: RwLock<Arc<Indexed>>,
    vectors: RwLock<Option<Arc<Vectors>>>,
    embedder: RwLock<Option<Embedder>>,
    /// Wakes the embedding task: a search wanted vectors the current index lacks.
    wanted: Arc<Notify>,
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
            vectors: RwLock::new(None),
            embedder: RwLock::new(None),
            wanted: Arc::new(Notify::new()),
        })
    }

    /// Ranks by embeddings from `embedder` whenever it can. The passages of an index are
    /// embedded in the background once a search wants them (nothing is sent upstream for a
    /// knowledge base nobody asks), at most every [`EMBED_EVERY`] while the tier fails.
    pub fn embed_with(self: &Arc<Self>, embedder: Embedder) {
        *write(&self.embedder) = Some(embedder.clone());
        let kb = Arc::downgrade(self);
        let wanted = self.wanted.clone();
        tokio::spawn(async move {
            loop {
                // Wake now and then even without a search, to notice the base was dropped.
                let _ = tokio::time::timeout(Duration::from_mins(1), wanted.notified()).await;
                let Some(kb) = kb.upgrade() else { return };
                let indexed = kb.snapshot();
                if kb.vectors_of(indexed.generation).is_some() {
                    continue;
                }
                match embed_passages(&embedder, &indexed.passages).await {
                    Ok(rows) => {
                        tracing::info!(passages = rows.len(), model = %embedder.model, "knowledge base embedded");
                        *write(&kb.vectors) = Some(Arc::new(Vectors {
                            generation: indexed.generation,
                            rows,
                        }));
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "knowledge passages not embedded yet; ranking with BM25");
                        drop(kb);
                        tokio::time::sleep(EMBED_EVERY).await;
                    }
                }
            }
        });
    }

    fn vectors_of(&self, generation: u64) -> Option<Arc<Vectors>> {
        read(&self.vectors).filter(|v| v.generation == generation)
    }

    /// The `limit` passages that answer `query` best, best first, and how they were ranked:
    /// by embeddings when the passages have them and the query can be embedded now, else BM25.
    pub async fn find(&self, query: &str, limit: usize) -> (Vec<Passage>, Ranking) {
        let indexed = self.snapshot();
        let embedder = read(&self.embedder);
        let vectors = self.vectors_of(indexed.generation);
        if embedder.is_some() && vectors.is_none() {
            self.wanted.notify_one();
        }
        if let (Some(embedder), Some(vectors)) = (embedder, vectors) {
            if !embedder.backend.circuit.is_open() {
                let question = [query.to_owned()];
                let asked = embedder.backend.provider.embed(&embedder.model, &question);
                match tokio::time::timeout(QUERY_EMBED_TIMEOUT, asked).await {
                    Ok(Ok(e)) if e.vectors.len() == 1 => {
                        let found = nearest(&e.vectors[0], &vectors.rows, limit)
                            .into_iter()
                            .filter_map(|i| indexed.passages.get(i).cloned())
                            .collect();
                        return (found, Ranking::Embeddings);
                    }
                    Ok(Ok(_)) => tracing::debug!("question not embedded; ranking with BM25"),
                    Ok(Err(err)) => {
                        tracing::debug!(error = %err, "question not embedded; ranking with BM25");
                    }
                    Err(_) => tracing::debug!("question embedding timed out; ranking with BM25"),
                }
            }
        }
        (self.search(query, limit), Ranking::Bm25)
    }

    fn snapshot(&self) -> Arc<Indexed> {
        read(&self.current)
    }

    /// How many passages are indexed.
    pub fn len(&self) -> usize {
        self.snapshot().passages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `limit` passages that answer `query` best by BM25, best first.
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
                        *write(&kb.current) = Arc::new(indexed);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "knowledge base not re-indexed; keeping the previous index");
                    }
                }
            }
        });
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What is embedded of a passage: its title, then its text.
fn embedded_text(p: &Passage) -> String {
    format!("{}\n{}", p.title, p.text)
}

/// Every passage's embedding, in order.
async fn embed_passages(
    embedder: &Embedder,
    passages: &[Passage],
) -> Result<Vec<Vec<f32>>, String> {
    let mut rows = Vec::with_capacity(passages.len());
    for chunk in passages.chunks(EMBED_BATCH) {
        let texts: Vec<String> = chunk.iter().map(embedded_text).collect();
        let e = embedder
            .backend
            .provider
            .embed(&embedder.model, &texts)
            .await
            .map_err(|e| e.to_string())?;
        if e.vectors.len() != texts.len() {
            return Err(format!(
                "{} embeddings for {} passages",
                e.vectors.len(),
                texts.len()
            ));
        }
        rows.extend(e.vectors);
    }
    Ok(rows)
}

/// The indexes of the `limit` rows most similar to `query` (cosine), most similar first.
fn nearest(query: &[f32], rows: &[Vec<f32>], limit: usize) -> Vec<usize> {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let q = norm(query);
    let mut scored: Vec<(usize, f32)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.len() == query.len())
        .map(|(i, r)| {
            let dot: f32 = r.iter().zip(query).map(|(a, b)| a * b).sum();
            let denominator = norm(r) * q;
            (
                i,
                if denominator > 0.0 {
                    dot / denominator
                } else {
                    0.0
                },
            )
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.into_iter().take(limit).map(|(i, _)| i).collect()
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
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
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

    /// Embeds a text as which of three words it mentions; refuses texts that say "unplugged".
    struct WordEmbedder;

    #[async_trait::async_trait]
    impl crate::providers::ChatProvider for WordEmbedder {
        fn provider(&self) -> claw_ledger::Provider {
            claw_ledger::Provider::Ollama
        }

        async fn chat(
            &self,
            _: &crate::providers::ChatRequest,
        ) -> Result<crate::providers::ChatStream, crate::providers::ProviderError> {
            Err(crate::providers::ProviderError::Connect(
                "no chat here".into(),
            ))
        }

        async fn embed(
            &self,
            _: &str,
            inputs: &[String],
        ) -> Result<crate::providers::Embeddings, crate::providers::ProviderError> {
            if inputs.iter().any(|t| t.contains("unplugged")) {
                return Err(crate::providers::ProviderError::Connect("embedder".into()));
            }
            let vectors = inputs
                .iter()
                .map(|t| {
                    let t = t.to_lowercase();
                    ["revoke", "nginx", "kafka"]
                        .map(|w| if t.contains(w) { 1.0 } else { 0.0 })
                        .into_iter()
                        .chain([0.01])
                        .collect()
                })
                .collect();
            Ok(crate::providers::Embeddings {
                vectors,
                prompt_tokens: None,
            })
        }

        async fn models(&self) -> Result<Vec<String>, crate::providers::ProviderError> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn with_an_embeddings_model_passages_rank_by_similarity_and_bm25_stands_in() {
        let kb = Arc::new(KnowledgeBase::shipped().unwrap());
        kb.embed_with(Embedder {
            backend: Backend::new(Arc::new(WordEmbedder)),
            model: "words".into(),
        });
        let (_, ranking) = kb.find("Which proxy settings matter for nginx?", 3).await;
        assert_eq!(
            ranking,
            Ranking::Bm25,
            "nothing embedded yet: this search asks for it"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kb.vectors_of(kb.snapshot().generation).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "passages never embedded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (found, ranking) = kb.find("Which proxy settings matter for nginx?", 3).await;
        assert_eq!(ranking, Ranking::Embeddings);
        assert_eq!(found.len(), 3);
        assert!(
            found
                .iter()
                .all(|p| embedded_text(p).to_lowercase().contains("nginx")),
            "{found:?}"
        );
        // The embedder fails on this question: BM25 answers instead.
        let (found, ranking) = kb
            .find("How do I revoke a key? (embedder unplugged)", 1)
            .await;
        assert_eq!(ranking, Ranking::Bm25);
        assert_eq!(found[0].source, "claw-keys.md");
    }

    #[test]
    fn nearest_ranks_by_cosine() {
        let rows = vec![vec![1.0, 0.0], vec![0.6, 0.8], vec![0.0, 1.0], vec![1.0]];
        assert_eq!(nearest(&[0.0, 2.0], &rows, 2), [2, 1]);
        assert_eq!(
            nearest(&[1.0, 0.1], &rows, 5),
            [0, 1, 2],
            "a row of the wrong size is skipped"
        );
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
