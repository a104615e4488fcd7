//! `silo plans`: plans as data from a shell (the same domain calls as
//! `/admin/v1/plans`). Audited as `cli`.

use anyhow::Context;

use super::{connect, print_json, CliError};
use crate::config::{PlanLimitArgs, PlansCommand};
use crate::registry::PlanFields;

const ACTOR: &str = "cli";

/// The fields `--clear` accepts.
const CLEARABLE: [&str; 11] = [
    "storage_quota_bytes",
    "requests_per_second",
    "wire_clients",
    "max_staff",
    "max_patients",
    "trial_days",
    "backup_schedule",
    "backup_keep_last",
    "backup_keep_daily",
    "backup_keep_weekly",
    "backup_keep_monthly",
];

/// The fields the arguments set, then those `clear` names cleared.
fn fields(a: PlanLimitArgs, clear: &[String]) -> Result<PlanFields, CliError> {
    let mut f = PlanFields {
        connection_limit: a.connection_limit,
        storage_quota_bytes: a.storage_quota_bytes.map(Some),
        requests_per_second: a.requests_per_second.map(Some),
        wire_clients: a.wire_clients.map(Some),
        max_staff: a.max_staff.map(Some),
        max_patients: a.max_patients.map(Some),
        trial_days: a.trial_days.map(Some),
        backup_schedule: a.backup_schedule.map(Some),
        backup_keep_last: a.backup_keep_last.map(Some),
        backup_keep_daily: a.backup_keep_daily.map(Some),
        backup_keep_weekly: a.backup_keep_weekly.map(Some),
        backup_keep_monthly: a.backup_keep_monthly.map(Some),
    };
    for field in clear {
        match field.as_str() {
            "storage_quota_bytes" => f.storage_quota_bytes = Some(None),
            "requests_per_second" => f.requests_per_second = Some(None),
            "wire_clients" => f.wire_clients = Some(None),
            "max_staff" => f.max_staff = Some(None),
            "max_patients" => f.max_patients = Some(None),
            "trial_days" => f.trial_days = Some(None),
            "backup_schedule" => f.backup_schedule = Some(None),
            "backup_keep_last" => f.backup_keep_last = Some(None),
            "backup_keep_daily" => f.backup_keep_daily = Some(None),
            "backup_keep_weekly" => f.backup_keep_weekly = Some(None),
            "backup_keep_monthly" => f.backup_keep_monthly = Some(None),
            other => {
                return Err(CliError::Usage(format!(
                    "--clear {other}: not a limit that can be cleared (one of {})",
                    CLEARABLE.join(", ")
                )))
            }
        }
    }
    Ok(f)
}

pub(super) async fn plans(cmd: PlansCommand) -> Result<(), CliError> {
    match cmd {
        PlansCommand::List { control } => {
            let p = connect(&control, 0).await?;
            for plan in p.registry().plans().await.context("list plans")? {
                println!(
                    "{}",
                    serde_json::to_string(&plan).expect("a plan serializes")
                );
            }
        }
        PlansCommand::Show { control, name } => {
            let p = connect(&control, 0).await?;
            let plan = p
                .registry()
                .plan(&name)
                .await
                .context("read the plan")?
                .ok_or_else(|| CliError::Usage(format!("no plan is named '{name}'")))?;
            print_json(&plan);
        }
        PlansCommand::Create {
            control,
            name,
            limits,
        } => {
            let p = connect(&control, 0).await?;
            let f = fields(limits, &[])?;
            print_json(&p.provisioner().create_plan(&name, &f, ACTOR).await?);
        }
        PlansCommand::Set {
            control,
            name,
            limits,
            clear,
        } => {
            let f = fields(limits, &clear)?;
            let p = connect(&control, 0).await?;
            print_json(&p.provisioner().update_plan(&name, &f, ACTOR).await?);
        }
        PlansCommand::Delete { control, name } => {
            let p = connect(&control, 0).await?;
            p.provisioner().delete_plan(&name, ACTOR).await?;
            println!("deleted plan {name}");
        }
    }
    Ok(())
}
