//! `strftime_now(format)` for chat templates (transformers: `datetime.now().strftime(format)`),
//! in UTC and without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats the current UTC time.
pub fn format_now_utc(format: &str) -> Result<String, String> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_unix(secs, format)
}

/// Formats a Unix time (seconds, UTC) with the C/Python `strftime` codes
/// `%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%`.
pub fn format_unix(secs: i64, format: &str) -> Result<String, String> {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod % 3600 / 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            return Err(format!("strftime_now({format:?}): a lone % at the end"));
        };
        let month = MONTHS[(m - 1) as usize];
        let day = DAYS[weekday];
        match code {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'm' => out.push_str(&format!("{m:02}")),
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:>2}")),
            'H' => out.push_str(&format!("{hh:02}")),
            'I' => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            'M' => out.push_str(&format!("{mm:02}")),
            'S' => out.push_str(&format!("{ss:02}")),
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'b' => out.push_str(&month[..3]),
            'B' => out.push_str(month),
            'a' => out.push_str(&day[..3]),
            'A' => out.push_str(day),
            'j' => out.push_str(&format!("{yday:03}")),
            '%' => out.push('%'),
            other => {
                return Err(format!(
                    "strftime_now({format:?}): the code %{other} is not supported (supported: %Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%)"
                ));
            }
        }
    }
    Ok(out)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        // 2024-07-26 13:25:09 UTC was a Friday, day 208 of a leap year (Python:
        // datetime(2024,7,26,13,5,9).strftime(...)).
        let t = 1_722_000_309;
        assert_eq!(
            format_unix(t, "%d %b %Y %H:%M:%S %A %j %I%p %%").unwrap(),
            "26 Jul 2024 13:25:09 Friday 208 01PM %"
        );
        assert_eq!(format_unix(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert_eq!(format_unix(951_782_400, "%Y-%m-%d").unwrap(), "2000-02-29");
        assert!(format_unix(0, "%Q").unwrap_err().contains("%Q"));
    }
}
