//! The highest rate a system keeps up with: the rate doubles while each
//! step passes, then the bracket between the highest rate that passed and
//! the lowest that failed above it is halved until it is narrow enough.
//! Deciding the next rate is a pure function of the steps so far.

/// One measured step: its offered rate and whether it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub rate: u64,
    pub passed: bool,
}

/// How a search goes.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    /// The first rate measured.
    pub first_rate: u64,
    /// The search ends once the failing rate is within this fraction of
    /// the passing one below it (0.05: the answer is within 5% of the
    /// limit the steps could see).
    pub resolution: f64,
    /// The search ends after this many steps, wherever it is.
    pub steps_max: usize,
}

impl Search {
    /// The rate to measure next, or `None` when the search is over.
    pub fn next_rate(&self, steps: &[Outcome]) -> Option<u64> {
        if steps.is_empty() {
            return Some(self.first_rate.max(1));
        }
        if steps.len() >= self.steps_max {
            return None;
        }
        let passed = highest_passed(steps).unwrap_or(0);
        let failed_above = steps
            .iter()
            .filter(|s| !s.passed && s.rate > passed)
            .map(|s| s.rate)
            .min();
        let Some(failed) = failed_above else {
            // Everything so far passed: double.
            return Some(passed.saturating_mul(2));
        };
        if (failed - passed) as f64 <= self.resolution * failed as f64 {
            return None;
        }
        let middle = passed + (failed - passed) / 2;
        // Below one a second, or a rate measured already: nothing to learn.
        (middle > 0 && !steps.iter().any(|s| s.rate == middle)).then_some(middle)
    }
}

/// The search's answer: the highest rate that passed, if any did.
pub fn highest_passed(steps: &[Outcome]) -> Option<u64> {
    steps.iter().filter(|s| s.passed).map(|s| s.rate).max()
}

/// The median of `values` (the mean of the middle two for an even
/// count); `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: Search = Search {
        first_rate: 1_000,
        resolution: 0.05,
        steps_max: 20,
    };

    /// Runs the search against a system that passes every rate up to
    /// `limit`, and returns the rates measured.
    fn run(search: Search, limit: u64) -> Vec<u64> {
        let mut steps = Vec::new();
        while let Some(rate) = search.next_rate(&steps) {
            steps.push(Outcome {
                rate,
                passed: rate <= limit,
            });
        }
        steps.iter().map(|s| s.rate).collect()
    }

    #[test]
    fn it_doubles_while_steps_pass() {
        let pass = |rate| Outcome { rate, passed: true };
        assert_eq!(SEARCH.next_rate(&[]), Some(1_000));
        assert_eq!(SEARCH.next_rate(&[pass(1_000)]), Some(2_000));
        assert_eq!(SEARCH.next_rate(&[pass(1_000), pass(2_000)]), Some(4_000));
    }

    #[test]
    fn after_a_failure_it_bisects_the_bracket() {
        let steps = [
            Outcome {
                rate: 1_000,
                passed: true,
            },
            Outcome {
                rate: 2_000,
                passed: false,
            },
        ];
        assert_eq!(SEARCH.next_rate(&steps), Some(1_500));
    }

    #[test]
    fn it_ends_within_the_resolution_of_the_limit() {
        let rates = run(SEARCH, 6_100);
        assert_eq!(&rates[..4], &[1_000, 2_000, 4_000, 8_000]);
        let steps: Vec<_> = rates
            .iter()
            .map(|&rate| Outcome {
                rate,
                passed: rate <= 6_100,
            })
            .collect();
        let answer = highest_passed(&steps).unwrap();
        assert!(
            answer <= 6_100 && answer as f64 >= 6_100.0 * 0.95,
            "{answer}"
        );
    }

    #[test]
    fn a_failing_first_step_searches_below_it() {
        let rates = run(SEARCH, 300);
        assert_eq!(&rates[..3], &[1_000, 500, 250]);
        let steps: Vec<_> = rates
            .iter()
            .map(|&rate| Outcome {
                rate,
                passed: rate <= 300,
            })
            .collect();
        assert!(highest_passed(&steps).unwrap() >= 285);
    }

    #[test]
    fn nothing_passes_and_the_search_still_ends() {
        let rates = run(SEARCH, 0);
        assert!(rates.len() <= SEARCH.steps_max);
        assert!(rates.iter().all(|&rate| rate > 0));
    }

    #[test]
    fn the_step_budget_ends_a_search() {
        let search = Search {
            steps_max: 3,
            ..SEARCH
        };
        assert_eq!(run(search, u64::MAX), vec![1_000, 2_000, 4_000]);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
