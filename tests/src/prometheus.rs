//! Reading the gateway's `/metrics` (Prometheus text format) in tests and the bench.

/// The value of the sample named exactly `series` (metric name with its labels, as the
/// exposition prints it: `claw_x_seconds_count`, `claw_x_seconds_bucket{le="0.001"}`).
#[must_use]
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::sample;

    const TEXT: &str = "# TYPE claw_x_seconds histogram
claw_x_seconds_bucket{le=\"0.001\"} 3
claw_x_seconds_bucket{le=\"+Inf\"} 5
claw_x_seconds_count_total 9
claw_x_seconds_count 5
";

    #[test]
    fn finds_the_exact_series_only() {
        assert_eq!(sample(TEXT, "claw_x_seconds_count"), Some(5.0));
        assert_eq!(
            sample(TEXT, "claw_x_seconds_bucket{le=\"+Inf\"}"),
            Some(5.0)
        );
        assert_eq!(
            sample(TEXT, "claw_x_seconds_bucket{le=\"0.001\"}"),
            Some(3.0)
        );
        assert_eq!(sample(TEXT, "claw_x_seconds"), None);
        assert_eq!(sample(TEXT, "claw_y_count"), None);
    }
}
