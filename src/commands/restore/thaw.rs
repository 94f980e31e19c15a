//! Restore through cold storage classes. An object in GLACIER or DEEP_ARCHIVE (or in an archive
//! tier of INTELLIGENT_TIERING) cannot be downloaded until S3 has thawed it — made a temporary
//! readable copy, which takes minutes to two days and costs money per request and per GB. So:
//!
//! - before anything is downloaded, one listing of the path counts the objects and bytes in each
//!   cold class (the listing names each object's class; a snapshot names none, so this pass is
//!   made for snapshot restores too) and says what a thaw at the chosen tier would cost at list
//!   prices ([`THAW_PRICES`]). Counts only, no keys: memory stays flat whatever the tree. It is
//!   an upper bound: every object under the path, also those a snapshot no longer names, and
//!   those thawed already;
//! - at download time a GET that S3 refuses with InvalidObjectState is `ErrorKind::Cold`, never a
//!   download error. Without `--thaw` the object is a per-file error of kind `cold`, named, and
//!   the restore ends with exit 2. With `--thaw` it is HEADed: a thaw running
//!   (`ongoing-request="true"`) is waited for, a thaw done (`ongoing-request="false"`) means the
//!   download is tried again, and only an object with no thaw gets a RestoreObject. So no object
//!   is ever asked for twice: a rerun finds the thaw it asked for on the HEAD;
//! - the restore then ends with exit 5 (`exit::THAWING`): run the same command again later.
//!   Files restored meanwhile are kept, so a rerun downloads only the thawed rest.
//!
//! INTELLIGENT_TIERING objects are listed as such whatever tier they are in: which of them are in
//! an archive tier shows only on a HEAD (`x-amz-archive-status`), which the listing pass does not
//! make (one request per object). They are counted when a download meets them, and thawed like
//! the others, without days (S3 moves them back to their Frequent Access tier instead).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use serde::Serialize;

use crate::config::StorageClass;
use crate::keys::{self, shown};
use crate::report::FileErrorKind;
use crate::store::{ArchiveTier, ObjectStore, StoreError, Thaw, ThawRequest, ThawTier};

/// `--thaw`, `--thaw-tier`, `--thaw-days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThawOptions {
    /// Ask S3 to thaw each archived object met (`--thaw`); without it they are only counted.
    pub request: bool,
    /// The retrieval tier asked for, and priced in the estimate.
    pub tier: ThawTier,
    /// How long a thawed copy stays readable.
    pub days: u32,
}

impl Default for ThawOptions {
    fn default() -> Self {
        ThawOptions {
            request: false,
            tier: ThawTier::Bulk,
            days: DEFAULT_DAYS,
        }
    }
}

/// `--thaw-days` unless given: a week is time enough to rerun the restore after a thaw of up to
/// 48 hours, and a short copy costs little (it is billed as STANDARD storage for its days).
pub const DEFAULT_DAYS: u32 = 7;

/// [`DEFAULT_DAYS`], for the command line's default.
pub const fn thaw_days() -> u32 {
    DEFAULT_DAYS
}

/// What thawing costs, at AWS's us-east-1 list prices as published on
/// https://aws.amazon.com/s3/pricing/ ("Requests & data retrievals"), 2026: per class and tier,
/// USD per 1,000 retrieval requests and USD per GB retrieved. Bulk thaws from GLACIER (Flexible
/// Retrieval) are free; DEEP_ARCHIVE has no expedited tier. docs/restore.md ("Cold storage
/// classes") shows the same table, and a test holds the two together.
pub const THAW_PRICES: [(StorageClass, ThawTier, f64, f64); 5] = [
    (StorageClass::Glacier, ThawTier::Bulk, 0.0, 0.0),
    (StorageClass::Glacier, ThawTier::Standard, 0.05, 0.01),
    (StorageClass::Glacier, ThawTier::Expedited, 10.00, 0.03),
    (StorageClass::DeepArchive, ThawTier::Bulk, 0.025, 0.0025),
    (StorageClass::DeepArchive, ThawTier::Standard, 0.10, 0.02),
];

/// The classes whose objects must be thawed, in the order they are reported.
const COLD: [StorageClass; 2] = [StorageClass::Glacier, StorageClass::DeepArchive];

/// A thaw at `tier` from `class` (or an Intelligent-Tiering archive tier) where one exists: an
/// expedited thaw from DEEP_ARCHIVE (or its Intelligent-Tiering counterpart) is a standard one,
/// the fastest there is.
pub fn tier_for(
    class: Option<StorageClass>,
    archive: Option<ArchiveTier>,
    tier: ThawTier,
) -> ThawTier {
    let deep =
        class == Some(StorageClass::DeepArchive) || archive == Some(ArchiveTier::DeepArchiveAccess);
    match tier {
        ThawTier::Expedited if deep => ThawTier::Standard,
        t => t,
    }
}

/// How long a thaw takes, as AWS documents it.
pub fn duration(class: StorageClass, tier: ThawTier) -> &'static str {
    match (class, tier_for(Some(class), None, tier)) {
        (StorageClass::DeepArchive, ThawTier::Bulk) => "within 48 hours",
        (StorageClass::DeepArchive, _) => "within 12 hours",
        (_, ThawTier::Bulk) => "5–12 hours",
        (_, ThawTier::Standard) => "3–5 hours",
        (_, ThawTier::Expedited) => "1–5 minutes",
    }
}

/// USD to thaw `objects` objects of `bytes` in all from `class` at `tier` and keep the copies
/// for `days` days: the retrieval requests, the GB retrieved, and the copies billed as STANDARD
/// storage for their days (a month counted as 30 days). `None` for a class that needs no thaw.
pub fn cost(
    class: StorageClass,
    tier: ThawTier,
    objects: u64,
    bytes: u64,
    days: u32,
) -> Option<f64> {
    let tier = tier_for(Some(class), None, tier);
    let (_, _, per_1000, per_gb) = THAW_PRICES
        .iter()
        .find(|(c, t, _, _)| *c == class && *t == tier)?;
    let gb = bytes as f64 / (1024.0 * 1024.0 * 1024.0);
    let standard = crate::config::price(StorageClass::Standard)?.per_gb_month;
    Some(objects as f64 / 1000.0 * per_1000 + gb * per_gb + gb * standard * f64::from(days) / 30.0)
}

/// An estimate in dollars as a person reads it: to the cent, and "under $0.01" rather than a
/// row of zeros.
fn dollars(usd: f64) -> String {
    if usd <= 0.0 {
        "nothing".to_owned()
    } else if usd < 0.01 {
        "under $0.01".to_owned()
    } else {
        format!("about ${usd:.2}")
    }
}

/// Objects and bytes under the path in one storage class, from the listing made before the
/// downloads.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ColdClass {
    pub class: String,
    pub objects: u64,
    pub bytes: u64,
    /// What thawing all of them would cost at the chosen tier (USD, list prices); `None` for
    /// INTELLIGENT_TIERING, whose archived objects the listing cannot tell apart (and whose
    /// bulk and standard thaws cost nothing).
    pub thaw_usd: Option<f64>,
}

/// The restore's figures about archived objects (part of `RestoreFigures`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ThawFigures {
    /// Objects a download found archived and not thawed: not restored.
    pub cold: u64,
    pub cold_bytes: u64,
    /// `--thaw`: thaw requests sent, and cold objects whose thaw was already running.
    pub thaw_requests: u64,
    pub thawing: u64,
    /// Objects in each cold class under the path, from the listing before the downloads.
    pub cold_listed: Vec<ColdClass>,
}

impl ThawFigures {
    /// Thaws to wait for: the restore is to be run again later.
    pub fn pending(&self) -> bool {
        self.thaw_requests + self.thawing > 0
    }
}

/// Live counters of [`ThawFigures`]; each event logs its line and bumps its counter in one place.
#[derive(Debug, Default)]
pub struct ThawStats {
    cold: AtomicU64,
    cold_bytes: AtomicU64,
    thaw_requests: AtomicU64,
    thawing: AtomicU64,
    cold_listed: OnceLock<Vec<ColdClass>>,
}

impl ThawStats {
    pub fn snapshot(&self) -> ThawFigures {
        ThawFigures {
            cold: self.cold.load(Relaxed),
            cold_bytes: self.cold_bytes.load(Relaxed),
            thaw_requests: self.thaw_requests.load(Relaxed),
            thawing: self.thawing.load(Relaxed),
            cold_listed: self.cold_listed.get().cloned().unwrap_or_default(),
        }
    }

    fn cold_met(&self, bytes: u64) {
        self.cold.fetch_add(1, Relaxed);
        self.cold_bytes.fetch_add(bytes, Relaxed);
    }

    /// Not restored, said as a file error by the caller: `Cold::NotRestored` of kind `cold`.
    fn cold_error(&self, bytes: u64, why: String) -> Cold {
        self.cold_met(bytes);
        Cold::NotRestored(FileErrorKind::Cold, why)
    }

    fn thaw_sent(&self, key: &str, bytes: u64, class: &str, tier: ThawTier, days: Option<u32>) {
        self.cold_met(bytes);
        self.thaw_requests.fetch_add(1, Relaxed);
        tracing::info!(
            key,
            bytes,
            "{}: in {class}, thaw requested ({} tier{}): run the same command again once it is \
             readable",
            shown(key),
            tier.as_str(),
            days.map(|d| format!(", readable for {d} days"))
                .unwrap_or_default()
        );
    }

    fn still_thawing(&self, key: &str, bytes: u64, class: &str) {
        self.cold_met(bytes);
        self.thawing.fetch_add(1, Relaxed);
        tracing::info!(
            key,
            bytes,
            "{}: in {class}, its thaw is still running (asked for before): run the same command \
             again later",
            shown(key)
        );
    }
}

/// Counts the objects in the cold classes (and INTELLIGENT_TIERING) under `sub`, page by page,
/// and says what it found and what a thaw would cost; the figures go to `stats`.
pub async fn survey<S: ObjectStore>(
    store: &S,
    prefix: &str,
    sub: &str,
    (thaw, dry_run): (ThawOptions, bool),
    stats: &ThawStats,
) -> Result<(), StoreError> {
    let list_prefix = format!("{prefix}{sub}");
    let order = [
        StorageClass::Glacier,
        StorageClass::DeepArchive,
        StorageClass::IntelligentTiering,
    ];
    let mut counts = [(0u64, 0u64); 3];
    let mut token = None;
    loop {
        let page = store.list_page(&list_prefix, None, token).await?;
        for o in page.objects {
            let key = format!("{sub}{}", o.key);
            // The prefix "home/alice" lists "home/alice2/…" too; nightcopy's own objects are
            // not files.
            if !keys::in_subpath(&key, sub) || keys::is_reserved(&key) {
                continue;
            }
            if let Some(i) = order.iter().position(|c| Some(*c) == o.storage_class) {
                counts[i].0 += 1;
                counts[i].1 += o.size;
            }
        }
        token = page.next;
        if token.is_none() {
            break;
        }
    }
    let found: Vec<ColdClass> = order
        .iter()
        .zip(counts)
        .filter(|(_, (n, _))| *n > 0)
        .map(|(class, (objects, bytes))| ColdClass {
            class: class.as_str().to_owned(),
            objects,
            bytes,
            thaw_usd: cost(*class, thaw.tier, objects, bytes, thaw.days),
        })
        .collect();
    say_survey(&found, thaw, dry_run);
    let _ = stats.cold_listed.set(found);
    Ok(())
}

/// The line the survey ends with: nothing to say below debug when no object is cold.
fn say_survey(found: &[ColdClass], thaw: ThawOptions, dry_run: bool) {
    let cold: Vec<&ColdClass> = found
        .iter()
        .filter(|c| COLD.iter().any(|k| k.as_str() == c.class))
        .collect();
    let tiering = found
        .iter()
        .find(|c| c.class == StorageClass::IntelligentTiering.as_str());
    let tiering_note = tiering.map(|t| {
        format!(
            "; {} INTELLIGENT_TIERING objects ({}): those in an archive tier are found when \
             downloaded (the listing does not say which), and not counted here",
            t.objects,
            bytesize::ByteSize(t.bytes).display().iec()
        )
    });
    if cold.is_empty() {
        match tiering_note {
            Some(note) => {
                tracing::info!("no object under the path is in GLACIER or DEEP_ARCHIVE{note}")
            }
            None => tracing::debug!("no object under the path is in a cold storage class"),
        }
        return;
    }
    let each: Vec<String> = cold
        .iter()
        .map(|c| {
            let class = COLD
                .into_iter()
                .find(|k| k.as_str() == c.class)
                .expect("a cold class");
            let tier = tier_for(Some(class), None, thaw.tier);
            let instead = if tier != thaw.tier {
                format!(
                    ", {} instead: {} has no {}",
                    tier.as_str(),
                    c.class,
                    thaw.tier.as_str()
                )
            } else {
                String::new()
            };
            format!(
                "{} objects in {} ({}; {} thaw {}{instead}, {})",
                c.objects,
                c.class,
                bytesize::ByteSize(c.bytes).display().iec(),
                tier.as_str(),
                duration(class, thaw.tier),
                dollars(c.thaw_usd.unwrap_or(0.0)),
            )
        })
        .collect();
    let total: f64 = cold.iter().filter_map(|c| c.thaw_usd).sum();
    let what = format!(
        "cold storage under the path: {}; thawing all of them costs {} at us-east-1 list \
         prices ({} tier, copies kept {} days; docs/restore.md, \"Cold storage classes\"). Any \
         already thawed are read as they are{}",
        each.join(", "),
        dollars(total),
        thaw.tier.as_str(),
        thaw.days,
        tiering_note.unwrap_or_default()
    );
    if dry_run {
        tracing::info!("{what}; a dry run asks for no thaw");
    } else if thaw.request {
        tracing::info!("{what}; --thaw: each is asked for once, as the restore meets it");
    } else {
        tracing::warn!(
            "{what}; without --thaw they are not restored: add --thaw (and --thaw-tier) to have \
             S3 thaw them, then run the same command again once they are readable"
        );
    }
}

/// The summary line's part: the cold objects met (and their thaws), and in a dry run, which
/// downloads nothing, what the listing found.
pub fn summary(f: &mut fmt::Formatter<'_>, g: &ThawFigures, dry_run: bool) -> fmt::Result {
    if g.cold > 0 {
        write!(
            f,
            ", {} cold objects ({}) need a thaw",
            g.cold,
            bytesize::ByteSize(g.cold_bytes).display().iec()
        )?;
        if g.thaw_requests + g.thawing > 0 {
            write!(
                f,
                ": {} thaw requests sent, {} already thawing; run the same command again once \
                 they are readable",
                g.thaw_requests, g.thawing
            )?;
        } else {
            write!(f, " (not restored; --thaw asks S3 for it)")?;
        }
    }
    if dry_run && !g.cold_listed.is_empty() {
        let each: Vec<String> = g
            .cold_listed
            .iter()
            .map(|c| {
                format!(
                    "{} {} objects ({}{})",
                    c.class,
                    c.objects,
                    bytesize::ByteSize(c.bytes).display().iec(),
                    c.thaw_usd
                        .map(|usd| format!(", thaw {}", dollars(usd)))
                        .unwrap_or_default()
                )
            })
            .collect();
        write!(f, "; cold storage under the path: {}", each.join(", "))?;
    }
    Ok(())
}

/// What became of a download S3 refused as cold.
#[derive(Debug, PartialEq, Eq)]
pub enum Cold {
    /// A thaw asked for or running: counted and said, nothing more to do in this run.
    Thawing,
    /// S3 says its thaw is done: the download is worth one more try.
    TryAgain,
    /// Not restored: a per-file error for the caller to count and name.
    NotRestored(FileErrorKind, String),
}

/// The object a download found cold.
#[derive(Debug, Clone, Copy)]
pub struct Met<'a> {
    /// The full key.
    pub key: &'a str,
    pub version_id: Option<&'a str>,
    pub size: u64,
}

/// A download S3 refused as cold (`e`). Without `--thaw`, not restored; with it, the object's
/// thaw as its HEAD says it is: running (wait), done (`TryAgain`, unless this was the last
/// attempt), or none (asked for now). `Err` only for a fatal store error.
pub async fn cold<S: ObjectStore>(
    store: &S,
    (thaw, stats): (ThawOptions, &ThawStats),
    met: Met<'_>,
    e: StoreError,
    last_attempt: bool,
) -> Result<Cold, StoreError> {
    if !thaw.request {
        return Ok(stats.cold_error(
            met.size,
            format!(
                "archived in a cold storage class (GLACIER, DEEP_ARCHIVE or an Intelligent-Tiering \
                 archive tier): rerun with --thaw to have S3 thaw it (docs/restore.md, \"Cold \
                 storage classes\"); {e}"
            ),
        ));
    }
    let head = match store.head_version(met.key, met.version_id).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            return Ok(Cold::NotRestored(
                FileErrorKind::Missing,
                "archived, and gone when its thaw was looked up".to_owned(),
            ))
        }
        Err(e) if e.is_fatal() => return Err(e),
        Err(head_error) => {
            return Ok(stats.cold_error(
                met.size,
                format!("archived, and its thaw could not be looked up: {head_error}"),
            ))
        }
    };
    let a = &head.archive;
    let class = match (a.class, a.tier) {
        (Some(c), Some(t)) => format!("{} {}", c.as_str(), t.as_str()),
        (Some(c), None) => c.as_str().to_owned(),
        (None, _) => "a cold storage class".to_owned(),
    };
    match &a.thaw {
        Some(Thaw::Running) => {
            stats.still_thawing(met.key, met.size, &class);
            Ok(Cold::Thawing)
        }
        Some(Thaw::Done { .. }) if !last_attempt => Ok(Cold::TryAgain),
        Some(Thaw::Done { expiry }) => Ok(stats.cold_error(
            met.size,
            format!(
                "S3 says its thaw is done{} but refused the download twice: run the same command \
                 again later; {e}",
                expiry
                    .as_deref()
                    .map(|x| format!(" (readable until {})", shown(x)))
                    .unwrap_or_default()
            ),
        )),
        None => {
            let tier = tier_for(a.class, a.tier, thaw.tier);
            // An Intelligent-Tiering object takes no days: it moves back to its Frequent Access
            // tier.
            let days = a.tier.is_none().then_some(thaw.days);
            match store
                .restore_object(met.key, met.version_id, days, tier)
                .await
            {
                Ok(ThawRequest::Sent) => stats.thaw_sent(met.key, met.size, &class, tier, days),
                Ok(ThawRequest::AlreadyRunning) => stats.still_thawing(met.key, met.size, &class),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    return Ok(stats.cold_error(
                        met.size,
                        format!("archived, and S3 refused its thaw request: {e}"),
                    ))
                }
            }
            Ok(Cold::Thawing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_thaw_costs_its_requests_its_gigabytes_and_the_copies_days() {
        let copy_week = 0.023 * 7.0 / 30.0; // per GB
                                            // (class, tier, objects, bytes, days, USD)
        let cases = [
            // Bulk from GLACIER is free; only the copy is billed.
            (
                StorageClass::Glacier,
                ThawTier::Bulk,
                2_000,
                1024 * GIB,
                7,
                1024.0 * copy_week,
            ),
            (
                StorageClass::Glacier,
                ThawTier::Standard,
                2_000,
                1024 * GIB,
                7,
                2.0 * 0.05 + 1024.0 * 0.01 + 1024.0 * copy_week,
            ),
            (
                StorageClass::Glacier,
                ThawTier::Expedited,
                1_000,
                GIB,
                7,
                10.0 + 0.03 + copy_week,
            ),
            (
                StorageClass::DeepArchive,
                ThawTier::Bulk,
                2_000,
                1024 * GIB,
                7,
                2.0 * 0.025 + 1024.0 * 0.0025 + 1024.0 * copy_week,
            ),
            (
                StorageClass::DeepArchive,
                ThawTier::Standard,
                500,
                GIB / 2,
                1,
                0.5 * 0.10 + 0.5 * 0.02 + 0.5 * 0.023 / 30.0,
            ),
            // No expedited tier in DEEP_ARCHIVE: priced (and asked for) as standard.
            (
                StorageClass::DeepArchive,
                ThawTier::Expedited,
                500,
                GIB / 2,
                1,
                0.5 * 0.10 + 0.5 * 0.02 + 0.5 * 0.023 / 30.0,
            ),
            (StorageClass::DeepArchive, ThawTier::Bulk, 0, 0, 7, 0.0),
        ];
        for (class, tier, objects, bytes, days, want) in cases {
            let got = cost(class, tier, objects, bytes, days).unwrap();
            assert!(close(got, want), "{class:?} {tier:?}: {got} != {want}");
        }
        // Classes that need no thaw have no thaw price.
        for class in [
            StorageClass::Standard,
            StorageClass::GlacierIr,
            StorageClass::IntelligentTiering,
        ] {
            assert_eq!(cost(class, ThawTier::Bulk, 1, 1, 7), None, "{class:?}");
        }
        assert_eq!(dollars(0.0), "nothing");
        assert_eq!(dollars(0.004), "under $0.01");
        assert_eq!(dollars(8.1054), "about $8.11");
    }

    #[test]
    fn expedited_is_standard_where_a_class_has_none() {
        let t = |c, a| tier_for(c, a, ThawTier::Expedited);
        assert_eq!(t(Some(StorageClass::Glacier), None), ThawTier::Expedited);
        assert_eq!(t(Some(StorageClass::DeepArchive), None), ThawTier::Standard);
        assert_eq!(
            t(
                Some(StorageClass::IntelligentTiering),
                Some(ArchiveTier::DeepArchiveAccess)
            ),
            ThawTier::Standard
        );
        assert_eq!(
            t(
                Some(StorageClass::IntelligentTiering),
                Some(ArchiveTier::ArchiveAccess)
            ),
            ThawTier::Expedited
        );
        assert_eq!(
            tier_for(Some(StorageClass::DeepArchive), None, ThawTier::Bulk),
            ThawTier::Bulk
        );
        assert_eq!(
            duration(StorageClass::DeepArchive, ThawTier::Expedited),
            "within 12 hours"
        );
        assert_eq!(
            duration(StorageClass::Glacier, ThawTier::Expedited),
            "1–5 minutes"
        );
    }

    /// docs/restore.md quotes the prices: a change of one must change the other.
    #[test]
    fn the_documented_thaw_prices_are_the_ones_used() {
        let doc = include_str!("../../../docs/restore.md");
        for (class, tier, per_1000, per_gb) in THAW_PRICES {
            let row = format!(
                "| {} | {} | {per_1000} | {per_gb} |",
                class.as_str(),
                tier.as_str()
            );
            assert!(doc.contains(&row), "docs/restore.md has no row {row:?}");
        }
        assert!(doc.contains("| DEEP_ARCHIVE | expedited | — | — |"));
    }
}
