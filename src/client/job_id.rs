//! A job as the user types it: the whole UUID, or any prefix of it that names one job (the
//! page shows the first 8 characters).

use anyhow::bail;

use super::Client;
use super::output::printable;

/// Jobs asked for at a time: the most one page of `GET /jobs` holds.
const PAGE: usize = 1000;

/// The whole id of the job `typed` names: a UUID as is, else the one job whose id starts
/// with it.
pub async fn resolve(c: &Client, typed: &str) -> anyhow::Result<String> {
    if let Ok(id) = typed.parse::<uuid::Uuid>() {
        return Ok(id.to_string());
    }
    // Every job, a page at a time (the server's pages hold at most PAGE).
    let mut jobs = Vec::new();
    loop {
        let page = c
            .get(&format!("/jobs?limit={PAGE}&offset={}", jobs.len()))
            .await?;
        let page = page.as_array().cloned().unwrap_or_default();
        let full = page.len() == PAGE;
        jobs.extend(page);
        if !full {
            break;
        }
    }
    let known: Vec<(&str, &str)> = jobs
        .iter()
        .filter_map(|j| Some((j["job_id"].as_str()?, j["name"].as_str().unwrap_or(""))))
        .collect();
    match pick(typed, &known) {
        Ok(id) => Ok(id),
        Err(why) => bail!("{why}"),
    }
}

/// The one id in `known` (id, name) that starts with `typed`, ignoring case; otherwise why not.
pub fn pick(typed: &str, known: &[(&str, &str)]) -> Result<String, String> {
    let prefix = typed.trim().to_ascii_lowercase();
    let shown = printable(typed);
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(format!(
            "no job with id {shown:?}: a job id is a UUID or the start of one (hex digits)"
        ));
    }
    let matches: Vec<&(&str, &str)> = known
        .iter()
        .filter(|(id, _)| id.starts_with(&prefix))
        .collect();
    match matches.as_slice() {
        [] => Err(format!("no job id starts with {shown:?}")),
        [(id, _)] => Ok(id.to_string()),
        many => {
            let listed: Vec<String> = many
                .iter()
                .take(5)
                .map(|(id, name)| match name {
                    &"" => id.to_string(),
                    n => format!("{id} ({})", printable(n)),
                })
                .collect();
            Err(format!(
                "{shown:?} is ambiguous: {} jobs start with it ({}{}); type more of the id",
                many.len(),
                listed.join(", "),
                if many.len() > 5 { ", …" } else { "" }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pick;

    const A: &str = "3dcb3e33-0000-4000-8000-000000000001";
    const B: &str = "3dcb3e33-0000-4000-8000-000000000002";
    const C: &str = "9f00aa11-0000-4000-8000-000000000003";

    #[test]
    fn a_unique_prefix_names_its_job_and_an_ambiguous_one_lists_them() {
        let known = [(A, "bert"), (B, ""), (C, "ddp")];
        assert_eq!(pick("9f00", &known).unwrap(), C);
        assert_eq!(pick("9F00AA11", &known).unwrap(), C, "any case");
        assert_eq!(
            pick("3dcb3e33-0000-4000-8000-00000000000", &known).unwrap_err(),
            format!(
                "\"3dcb3e33-0000-4000-8000-00000000000\" is ambiguous: 2 jobs start with it ({A} (bert), {B}); type more of the id"
            )
        );
        assert_eq!(
            pick("77", &known).unwrap_err(),
            "no job id starts with \"77\""
        );
        assert!(
            pick("", &known)
                .unwrap_err()
                .contains("a UUID or the start of one")
        );
        assert!(
            pick("bert", &known)
                .unwrap_err()
                .contains("a UUID or the start of one")
        );
    }
}
