//! Timestamps for the job store: unix milliseconds (UTC) as `i64`, and their RFC 3339 form.
//!
//! The store keeps every timestamp as INTEGER unix milliseconds so that SQL can compare and order them
//! without parsing; callers that show a time to people (the HTTP API) format it with [`rfc3339_from_millis`].
//! Written by hand so the crate needs no date-time dependency.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds in one day.
const MILLIS_PER_DAY: i64 = 86_400_000;

/// The current time as unix milliseconds (UTC); the one clock every store timestamp comes from.
///
/// A system clock set before 1970 yields a negative value rather than a panic.
pub fn now_millis() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Formats unix milliseconds as an RFC 3339 UTC timestamp with millisecond precision,
/// e.g. `2023-11-14T22:13:20.000Z`, for API responses and logs.
///
/// Years outside 0000–9999 (which RFC 3339 cannot express) are written with as many digits as needed and a
/// leading `-` for years before year 0 (proleptic Gregorian calendar, astronomical year numbering).
pub fn rfc3339_from_millis(millis: i64) -> String {
    let days = millis.div_euclid(MILLIS_PER_DAY);
    let ms_of_day = millis.rem_euclid(MILLIS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let secs_of_day = ms_of_day / 1000;
    let (hour, minute, second, milli) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60, ms_of_day % 1000);
    let year = if year < 0 { format!("-{:04}", -year) } else { format!("{year:04}") };
    format!("{year}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// Converts a count of days since 1970-01-01 into a proleptic Gregorian (year, month 1–12, day 1–31).
///
/// Works in 400-year eras (146,097 days each) counted from 0000-03-01, so that the leap day is the last day of
/// each shifted year and month lengths follow a simple linear formula.
fn civil_from_days(days_since_epoch: i64) -> (i64, u32, u32) {
    // 719,468 days separate 0000-03-01 from 1970-01-01.
    let z = days_since_epoch + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let shifted_month = (5 * day_of_year + 2) / 153; // [0, 11], March = 0
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32; // [1, 31]
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_leap(year: i64) -> bool {
        (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
    }

    fn days_in_month(year: i64, month: u32) -> u32 {
        match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            _ if is_leap(year) => 29,
            _ => 28,
        }
    }

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339_from_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_from_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_from_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_from_millis(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_from_millis(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_from_millis(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_from_millis(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_from_millis(-62_167_219_200_000), "0000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_from_millis(-62_167_219_200_001), "-0001-12-31T23:59:59.999Z");
    }

    /// Walks the calendar one day at a time with the naive month-length rules and checks every day of
    /// ±1000 years around the epoch against the closed-form conversion.
    #[test]
    fn matches_a_naive_calendar_walk() {
        let (mut y, mut m, mut d) = (1970_i64, 1_u32, 1_u32);
        for days in 0..366_000 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > days_in_month(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        let (mut y, mut m, mut d) = (1970_i64, 1_u32, 1_u32);
        for days in (-366_000..0).rev() {
            d -= 1;
            if d == 0 {
                if m == 1 {
                    m = 12;
                    y -= 1;
                } else {
                    m -= 1;
                }
                d = days_in_month(y, m);
            }
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
        }
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let _ = rfc3339_from_millis(i64::MIN);
        let _ = rfc3339_from_millis(i64::MAX);
        assert!(now_millis() > 1_600_000_000_000);
    }
}
