//! (Pending.)

#[derive(clap::Args, Debug, Default)]
pub struct Args {}

pub fn run(_args: Args, _verbose: u8) -> anyhow::Result<()> {
    anyhow::bail!("this command is not built yet")
}
