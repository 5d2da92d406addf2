//! AUTOMATIC1111's sampler and scheduler names mapped to this server's samplers and
//! schedules (names and aliases match case-insensitively, as AUTOMATIC1111 matches them).

use sdxl_engine::request::{Sampler, ScheduleKind, Spacing};
use sdxl_engine::Sampling;

/// A sampler's AUTOMATIC1111 aliases beside its label.
pub fn aliases(sampler: Sampler) -> &'static [&'static str] {
    match sampler {
        Sampler::Euler => &["k_euler"],
        Sampler::EulerAncestral => &["k_euler_a", "k_euler_ancestral"],
        Sampler::Heun => &["k_heun"],
        Sampler::DpmPp2M => &["k_dpmpp_2m"],
        Sampler::DpmPp2MSde => &["k_dpmpp_2m_sde"],
        Sampler::Ddim => &["ddim"],
        Sampler::UniPc => &["unipc"],
        Sampler::Lcm => &["k_lcm"],
    }
}

/// The schedules `GET /sdapi/v1/schedulers` lists: (name, label, ours).
pub const SCHEDULERS: [(&str, &str, ScheduleKind); 3] = [
    ("automatic", "Automatic", ScheduleKind::Model),
    ("karras", "Karras", ScheduleKind::Karras),
    ("sgm_uniform", "SGM Uniform", ScheduleKind::Spacing(Spacing::Trailing)),
];

/// `sampler_name` (label, alias or our own name; the pre-1.9 "… Karras" names carry their
/// schedule): `None` for a sampler this server does not have.
pub fn sampler(name: &str) -> Option<(Sampler, Option<ScheduleKind>)> {
    let find = |name: &str| {
        Sampler::ALL.into_iter().find(|s| {
            s.label().eq_ignore_ascii_case(name)
                || s.name().eq_ignore_ascii_case(name)
                || aliases(*s).iter().any(|a| a.eq_ignore_ascii_case(name))
        })
    };
    if let Some(sampler) = find(name.trim()) {
        return Some((sampler, None));
    }
    let stem = name.trim().strip_suffix(" Karras").or_else(|| name.trim().strip_suffix(" karras"))?;
    find(stem).map(|s| (s, Some(ScheduleKind::Karras)))
}

/// `scheduler` (name or label): `None` for one this server does not have.
pub fn scheduler(name: &str) -> Option<ScheduleKind> {
    let name = name.trim();
    SCHEDULERS
        .iter()
        .find(|(n, label, _)| n.eq_ignore_ascii_case(name) || label.eq_ignore_ascii_case(name))
        .map(|&(_, _, kind)| kind)
}

/// What a request's names resolve to, and the notes for names that fell back: unknown
/// samplers run as Euler, unknown schedulers as Automatic (AUTOMATIC1111 clients send the
/// names of their own server's list). A known pair diffusers does not offer is an error.
pub fn resolve(sampler_name: Option<&str>, scheduler_name: Option<&str>) -> (Sampling, Vec<(&'static str, String)>) {
    let mut notes = Vec::new();
    let (sampler, implied) = match sampler_name {
        None => (Sampler::default(), None),
        Some(name) => sampler(name).unwrap_or_else(|| {
            notes.push(("Sampler", format!("{name} → {}", Sampler::default().label())));
            (Sampler::default(), None)
        }),
    };
    let schedule = match scheduler_name {
        None => implied.unwrap_or_default(),
        Some(name) => scheduler(name).unwrap_or_else(|| {
            notes.push(("Schedule type", format!("{name} → Automatic")));
            ScheduleKind::Model
        }),
    };
    (Sampling { sampler, schedule }, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_karras_suffixes_resolve() {
        assert_eq!(sampler("Euler a"), Some((Sampler::EulerAncestral, None)));
        assert_eq!(sampler("k_euler"), Some((Sampler::Euler, None)));
        assert_eq!(sampler("dpm++ 2m sde"), Some((Sampler::DpmPp2MSde, None)));
        assert_eq!(sampler("DPM++ 2M Karras"), Some((Sampler::DpmPp2M, Some(ScheduleKind::Karras))));
        assert_eq!(sampler("DPM2"), None);
        assert_eq!(scheduler("SGM Uniform"), Some(ScheduleKind::Spacing(Spacing::Trailing)));
        assert_eq!(scheduler("Automatic"), Some(ScheduleKind::Model));
        let (sampling, notes) = resolve(Some("Restart"), Some("Exponential"));
        assert_eq!(sampling, Sampling::default());
        assert_eq!(notes.len(), 2);
    }
}
