//! Progress on a terminal (indicatif bars), plain lines otherwise (CI, pipes).

pub(super) struct FleetProgressView {
    bar: Option<indicatif::ProgressBar>,
}

impl FleetProgressView {
    pub(super) fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} tenants, {msg} [{elapsed}, {per_sec}]",
                )
                .expect("valid template"),
            );
            bar
        });
        Self { bar }
    }

    /// One tenant done (`failed` or not); `counts` so far.
    pub(super) fn update(&self, slug: &str, failed: bool, counts: crate::migrate::FleetProgress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(counts.total as u64);
                bar.set_position(counts.done as u64);
                bar.set_message(format!("{} failed, {} left", counts.failed, counts.left));
                if failed {
                    bar.println(format!("{slug}: failed"));
                }
            }
            None => {
                if failed || counts.done % 50 == 0 || counts.left == 0 {
                    eprintln!(
                        "{} done, {} failed, {} left{}",
                        counts.done,
                        counts.failed,
                        counts.left,
                        if failed {
                            format!(" ({slug} failed)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

pub(super) fn bytes_bar(total: Option<i64>, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        eprintln!("{what}...");
        return None;
    }
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n.max(0) as u64),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} {bar:40} {bytes}/{total_bytes} [{elapsed}, {bytes_per_sec}]"
    } else {
        "{spinner} {msg} {bytes} [{elapsed}, {bytes_per_sec}]"
    };
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(bar)
}
