//! Which storage class each object goes to: `destination.storage-class` for most, and the
//! `small-files` rule for files too small to be worth that class. STANDARD_IA, ONEZONE_IA and
//! GLACIER_IR bill every object as at least 128 KiB; GLACIER and DEEP_ARCHIVE add 40 KiB per
//! object (32 KiB at their rate, 8 KiB at STANDARD's) and cost 6 to 10 times STANDARD's price per
//! PUT. Below a size, STANDARD is cheaper; that size is computed here from AWS's prices, not
//! guessed, and is the default rule for each class (docs/storage-classes.md shows the figures).

use serde::{Deserialize, Serialize};

use super::{Size, StorageClass};

/// How long an object is assumed to be kept when a one-time PUT price is weighed against monthly
/// storage: a backup is kept for years, and a year is the shortest horizon that still makes the
/// PUT price count for the Glacier classes (whose PUTs cost 6–10 × STANDARD's).
pub const HORIZON_MONTHS: f64 = 12.0;

/// AWS's list prices for one class in us-east-1 (aws.amazon.com/s3/pricing, first storage tier,
/// as published in 2025): USD per GB-month, USD per 1,000 PUTs, and how small objects are billed.
#[derive(Debug, Clone, Copy)]
pub struct Price {
    pub per_gb_month: f64,
    pub per_1000_puts: f64,
    /// Objects smaller than this (bytes) are billed as this size.
    pub min_billed: u64,
    /// Bytes added to every object at this class's rate (index data for Glacier).
    pub overhead_own: u64,
    /// Bytes added to every object at STANDARD's rate (the name and metadata Glacier keeps in
    /// STANDARD).
    pub overhead_standard: u64,
}

const KIB: u64 = 1024;

pub fn price(class: StorageClass) -> Option<Price> {
    let p = |per_gb_month, per_1000_puts, min_billed, overhead_own, overhead_standard| Price {
        per_gb_month,
        per_1000_puts,
        min_billed,
        overhead_own,
        overhead_standard,
    };
    Some(match class {
        StorageClass::Standard => p(0.023, 0.005, 0, 0, 0),
        StorageClass::StandardIa => p(0.0125, 0.01, 128 * KIB, 0, 0),
        StorageClass::OnezoneIa => p(0.01, 0.01, 128 * KIB, 0, 0),
        StorageClass::GlacierIr => p(0.004, 0.02, 128 * KIB, 0, 0),
        StorageClass::Glacier => p(0.0036, 0.03, 0, 32 * KIB, 8 * KIB),
        StorageClass::DeepArchive => p(0.00099, 0.05, 0, 32 * KIB, 8 * KIB),
        // Objects under 128 KiB are never tiered and cost STANDARD's price, without the monitoring
        // fee: no small-file penalty to avoid. REDUCED_REDUNDANCY is deprecated.
        StorageClass::IntelligentTiering | StorageClass::ReducedRedundancy => return None,
    })
}

/// What one object of `size` bytes costs over the horizon: its PUT and its storage.
pub fn cost(class: StorageClass, size: u64) -> Option<f64> {
    let p = price(class)?;
    let standard = price(StorageClass::Standard)?;
    let gb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0 * 1024.0);
    let monthly = p.per_gb_month * gb(size.max(p.min_billed) + p.overhead_own)
        + standard.per_gb_month * gb(p.overhead_standard);
    Some(p.per_1000_puts / 1000.0 + HORIZON_MONTHS * monthly)
}

/// The smallest size, in whole KiB, from which `class` costs no more than STANDARD; `None` for a
/// class with no small-file penalty.
pub fn break_even(class: StorageClass) -> Option<u64> {
    if class == StorageClass::Standard {
        return None;
    }
    price(class)?;
    let cheaper = |kib: u64| cost(class, kib * KIB) <= cost(StorageClass::Standard, kib * KIB);
    // The difference falls as the size grows (STANDARD's price per byte is the highest), so the
    // first size where the class is cheaper is found by bisection.
    let (mut lo, mut hi) = (0u64, 1024 * 1024u64);
    if !cheaper(hi) {
        return None;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if cheaper(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// `destination.small-files`: files smaller than `below` go to `storage-class` instead of the
/// destination's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SmallFiles {
    pub below: Size,
    #[serde(default = "standard")]
    pub storage_class: StorageClass,
}

fn standard() -> StorageClass {
    StorageClass::Standard
}

impl SmallFiles {
    /// The rule that saves money for `class`, when it has a small-file penalty.
    pub fn default_for(class: Option<StorageClass>) -> Option<SmallFiles> {
        break_even(class?).map(|kib| SmallFiles {
            below: Size(kib * KIB),
            storage_class: StorageClass::Standard,
        })
    }
}

/// The storage class of each object, by its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassRule {
    /// `None`: the bucket's default (STANDARD), sent as no header at all.
    pub class: Option<StorageClass>,
    pub small: Option<SmallFiles>,
}

impl ClassRule {
    pub fn for_size(&self, size: u64) -> Option<StorageClass> {
        match self.small {
            Some(s) if size < s.below.0 => Some(s.storage_class),
            _ => self.class,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults the documentation quotes (docs/storage-classes.md): a change of prices or of
    /// the formula must change the docs too.
    #[test]
    fn break_evens_are_the_documented_ones() {
        let got: Vec<_> = [
            StorageClass::StandardIa,
            StorageClass::OnezoneIa,
            StorageClass::GlacierIr,
            StorageClass::Glacier,
            StorageClass::DeepArchive,
        ]
        .into_iter()
        .map(|c| (c.as_str(), break_even(c).unwrap()))
        .collect();
        assert_eq!(
            got,
            [
                ("STANDARD_IA", 89),
                ("ONEZONE_IA", 75),
                ("GLACIER_IR", 80),
                ("GLACIER", 129),
                ("DEEP_ARCHIVE", 189),
            ]
        );
        assert_eq!(break_even(StorageClass::Standard), None);
        assert_eq!(break_even(StorageClass::IntelligentTiering), None);
    }

    #[test]
    fn at_the_break_even_the_class_is_cheaper_and_just_below_it_is_not() {
        for c in [StorageClass::StandardIa, StorageClass::DeepArchive] {
            let b = break_even(c).unwrap() * KIB;
            assert!(cost(c, b) <= cost(StorageClass::Standard, b));
            let below = b - KIB;
            assert!(cost(c, below) > cost(StorageClass::Standard, below));
        }
    }

    #[test]
    fn small_files_take_their_own_class() {
        let rule = ClassRule {
            class: Some(StorageClass::DeepArchive),
            small: SmallFiles::default_for(Some(StorageClass::DeepArchive)),
        };
        assert_eq!(rule.for_size(0), Some(StorageClass::Standard));
        assert_eq!(rule.for_size(188 * KIB), Some(StorageClass::Standard));
        assert_eq!(rule.for_size(189 * KIB), Some(StorageClass::DeepArchive));
        let none = ClassRule::default();
        assert_eq!(none.for_size(1), None);
    }
}
