//! `bfpo-lite devices`: the GPU adapters wgpu can use.

use bfpo_lite::gpu::Gpu;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn mib(b: u64) -> String {
    if b >= 1 << 40 {
        format!("{} TiB", b >> 40)
    } else if b >= 1 << 30 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

pub fn run(args: Args, _verbose: u8) -> anyhow::Result<()> {
    let adapters = Gpu::adapters();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    if adapters.is_empty() {
        anyhow::bail!(
            "no GPU adapter found. On Linux without a GPU install lavapipe: sudo apt-get install mesa-vulkan-drivers"
        );
    }
    for a in &adapters {
        println!("{}: {} ({}, {})", a.index, a.name, a.device_type, a.backend);
        println!("   driver: {} {}", a.driver, a.driver_info);
        println!(
            "   max binding {} · max buffer {} · workgroup memory {} KiB · {} invocations · subgroup {}–{}",
            mib(a.max_storage_buffer_binding_size),
            mib(a.max_buffer_size),
            a.max_compute_workgroup_storage_size / 1024,
            a.max_compute_invocations_per_workgroup,
            a.subgroup_min_size,
            a.subgroup_max_size
        );
        println!(
            "   features: {}",
            if a.features.is_empty() {
                "-".to_string()
            } else {
                a.features.join(", ")
            }
        );
    }
    println!("\nPick one with --device INDEX|NAME (or BFPO_DEVICE).");
    Ok(())
}
