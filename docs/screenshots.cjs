// Two screenshots of MLflow's UI for the README, taken by docs/screenshots.py (which starts the UI):
//   node docs/screenshots.cjs <charts link> <gradient link> <output folder>
// (links printed by `rnn ui`, each with a searchFilter choosing its runs)
// playwright-core drives the system's Chromium (CHROMIUM, default /usr/bin/chromium).
const { chromium } = require(process.env.PLAYWRIGHT_CORE || 'playwright-core');
const path = require('path');

async function main([link, gradientLink, outDir]) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--no-first-run'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    await page.goto(link);
    // A fresh browser opens MLflow's assistant beside the charts: close it to give them the width.
    const close = page.getByRole('button', { name: 'Close' });
    await close.first().waitFor({ timeout: 60000 }).then(() => close.first().click(), () => {});
    await page.getByText('accuracy/val', { exact: true }).first().waitFor({ timeout: 60000 });
    await page.waitForTimeout(3000);                 // the charts draw after their data arrives
    await page.screenshot({ path: path.join(outDir, 'mlflow-charts.png') });

    // One chart, full screen: the three cells' gradient by distance from the last token.
    const key = 'gradient/log10_dL_da_last_epoch';
    if (gradientLink !== link) {
      await page.goto(gradientLink);
      await page.getByText('accuracy/val', { exact: true }).first().waitFor({ timeout: 60000 });
    }
    await page.getByPlaceholder('Search metric charts').fill(key);
    await page.getByText(key, { exact: true }).first().waitFor({ timeout: 60000 });
    await page.waitForTimeout(1000);
    const card = page.locator('[data-testid="experiment-view-compare-runs-card"]').first();
    const expand = (await card.count()) ? card.getByRole('button').first() : page.getByRole('button', { name: /full ?screen/i }).first();
    await expand.click();
    await page.waitForTimeout(3000);
    await page.screenshot({ path: path.join(outDir, 'mlflow-vanishing-gradient.png') });
  } finally {
    await browser.close();
  }
}

main(process.argv.slice(2)).catch((err) => { console.error(err.message || err); process.exit(1); });
