import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.TimeUnit;

import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.recipes.leader.LeaderLatch;
import org.apache.curator.framework.recipes.leader.LeaderLatchListener;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.retry.RetryOneTime;

/**
 * A Curator 5.x peer for waypost's interop tests, driven over stdin/stdout, one command
 * a line, one answer a line:
 *
 * <pre>
 * java CuratorPeer CONNECT_STRING mutex PATH
 *   ACQUIRE -> ACQUIRED           (InterProcessMutex.acquire(), blocks)
 *   TRY     -> ACQUIRED | BUSY    (acquire(100 ms))
 *   RELEASE -> RELEASED
 * java CuratorPeer CONNECT_STRING latch PATH ID
 *   START   -> STARTED, later LEADER / NOT_LEADER as it changes (LeaderLatch)
 *   LEADER? -> LEADER_IS ID | LEADER_IS -
 *   CLOSE   -> CLOSED             (then START makes a new latch)
 * QUIT ends the process; READY is printed once connected.
 * </pre>
 */
public final class CuratorPeer {
    private static synchronized void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    public static void main(String[] args) throws Exception {
        String connect = args[0];
        String mode = args[1];
        String path = args[2];
        CuratorFramework client = CuratorFrameworkFactory.builder()
                .connectString(connect)
                .sessionTimeoutMs(4000)
                .connectionTimeoutMs(5000)
                .retryPolicy(new RetryOneTime(100))
                .build();
        client.start();
        if (!client.blockUntilConnected(20, TimeUnit.SECONDS)) {
            say("ERROR not connected");
            System.exit(2);
        }
        InterProcessMutex mutex = new InterProcessMutex(client, path);
        LeaderLatch latch = null;
        say("READY");
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            try {
                switch (line.trim()) {
                    case "ACQUIRE":
                        mutex.acquire();
                        say("ACQUIRED");
                        break;
                    case "TRY":
                        say(mutex.acquire(100, TimeUnit.MILLISECONDS) ? "ACQUIRED" : "BUSY");
                        break;
                    case "RELEASE":
                        mutex.release();
                        say("RELEASED");
                        break;
                    case "START":
                        latch = new LeaderLatch(client, path, args[3]);
                        latch.addListener(new LeaderLatchListener() {
                            public void isLeader() { say("LEADER"); }
                            public void notLeader() { say("NOT_LEADER"); }
                        });
                        latch.start();
                        say("STARTED");
                        break;
                    case "LEADER?":
                        String id = latch.getLeader().getId();
                        say("LEADER_IS " + (id.isEmpty() ? "-" : id));
                        break;
                    case "CLOSE":
                        latch.close();
                        latch = null;
                        say("CLOSED");
                        break;
                    case "QUIT":
                        client.close();
                        return;
                    default:
                        say("ERROR unknown command " + line);
                }
            } catch (Exception e) {
                say("ERROR " + e);
            }
        }
        client.close();
    }
}
